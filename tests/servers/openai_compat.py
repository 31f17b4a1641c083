"""A small OpenAI-compatible chat-completions server over a local transformers model.

It serves a real model through `stepflow.llm.local.LocalBackend` (greedy decoding), so
clients can be tested against real generations over real HTTP. Fault injection for retry
tests: `POST /admin/faults {"count": 2, "status": 503}` makes the next two chat requests
fail with that status; `{"count": 1, "delay_s": 3}` delays the next one instead;
`{"count": 1, "body": "non_json"}` answers 200 with an HTML page, `"truncated_json"` with a
JSON document cut in half, `"cut"` closes the connection in the middle of the body;
`"retry_after": 2` adds that header (seconds, or an HTTP-date string) to a fault's status
answer.
`GET /admin/requests` lists the chat requests received (arrival time on the monotonic
clock, messages, the status answered), `DELETE /admin/requests` forgets them.

    python tests/servers/openai_compat.py --model embedded --port 8000 [--api-key-env VAR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Literal

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from stepflow.llm.local import LocalBackend


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False


class Faults(BaseModel):
    count: int = 1
    status: int | None = None
    delay_s: float = 0.0
    body: Literal["non_json", "truncated_json", "cut"] | None = None
    retry_after: int | str | None = None  # seconds, or an HTTP-date


def broken_answer(kind: str) -> Response:
    """A 200 answer that is not a usable chat completion."""
    if kind == "non_json":
        page = "<html><body>502 Bad Gateway (proxy)</body></html>"
        return Response(content=page, status_code=200, media_type="text/html")
    document = '{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"index": 0, '
    if kind == "truncated_json":
        return Response(content=document, status_code=200, media_type="application/json")
    # announces more bytes than it sends: the server closes the connection mid-body
    return Response(
        content=document,
        status_code=200,
        media_type="application/json",
        headers={"content-length": str(len(document) * 2)},
    )


def create_app(backend: LocalBackend, served_name: str, api_key: str | None) -> FastAPI:
    """The FastAPI app serving `backend` under the model name `served_name`."""
    app = FastAPI()
    faults: list[Faults] = []
    seen: list[dict] = []

    def check_key(authorization: str | None) -> None:
        if api_key is not None and authorization != f"Bearer {api_key}":
            raise HTTPException(status_code=401, detail="invalid API key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(default=None)) -> dict:
        check_key(authorization)
        length = backend.model.config.max_position_embeddings  # as vLLM's max_model_len
        entry = {"id": served_name, "object": "model", "max_model_len": length}
        return {"object": "list", "data": [entry]}

    @app.post("/admin/faults")
    async def inject(spec: Faults) -> dict:
        faults.extend([spec.model_copy(update={"count": 1})] * spec.count)
        return {"pending": len(faults)}

    @app.delete("/admin/faults")
    async def clear() -> dict:
        faults.clear()
        return {"pending": 0}

    @app.get("/admin/requests")
    async def requests() -> list[dict]:
        return seen

    @app.delete("/admin/requests")
    async def forget() -> dict:
        seen.clear()
        return {"requests": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest, authorization: str | None = Header(default=None)):
        check_key(authorization)
        record = {
            "at": time.monotonic(),
            "messages": [m.model_dump() for m in request.messages],
            "status": 200,
        }
        seen.append(record)
        if faults:
            fault = faults.pop(0)
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.body is not None:
                record["status"] = f"200 {fault.body}"
                return broken_answer(fault.body)
            if fault.status is not None:
                record["status"] = fault.status
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                return JSONResponse(
                    status_code=fault.status,
                    content={"error": {"message": "injected fault", "code": fault.status}},
                    headers=headers,
                )
        if request.model != served_name:
            record["status"] = 404
            raise HTTPException(status_code=404, detail=f"model {request.model!r} not served")
        if request.stream:
            record["status"] = 400
            raise HTTPException(status_code=400, detail="streaming is not supported")
        completion = await backend.complete(
            [m.model_dump() for m in request.messages],
            max_new_tokens=request.max_completion_tokens or request.max_tokens,
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--served-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None, help="require this env var's key")
    args = parser.parse_args()
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    backend = LocalBackend(args.model, reuse_cache=False)
    app = create_app(backend, args.served_name or args.model, api_key)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2
    )


if __name__ == "__main__":
    main()
