"""LoRA adapters on a serving endpoint: loaded into a running vLLM server at run time.

A trained adapter is served under `<agent>-<first 12 hex of its weights' sha256>`, so a
retrained adapter never hides behind a stale one of the same agent name, and loading the
same weights twice is a no-op.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stepflow.config import EndpointConfig, LLMConfig
from stepflow.llm.base import BackendError
from stepflow.llm.endpoint import api_key_from_env
from stepflow.method import ADAPTER_CONFIG, UNTRAINED
from stepflow.provenance import (
    GENERATION_MARGIN,
    adapter_digest,
    generation_shortfall,
    trained_turn_tokens,
)

log = logging.getLogger(__name__)


def served_name(agent: str, adapter: Path) -> str:
    """The model name an adapter is served under."""
    return f"{agent}-{adapter_digest(adapter)}"


def adapters_preloaded(llm: LLMConfig) -> bool:
    """Whether `llm` is an endpoint that already serves each adapter under the agent's name
    (`endpoint.load_adapters: false`), so no local adapter directory is read."""
    return llm.backend == "openai" and llm.endpoint is not None and not llm.endpoint.load_adapters


def load_adapter(
    endpoint: EndpointConfig, name: str, adapter: Path, timeout_s: float = 300
) -> None:
    """Load a LoRA adapter into every server of the endpoint (`POST /v1/load_lora_adapter`);
    already loaded under this name is fine. The servers must run with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    path = Path(adapter).resolve()
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    for base_url in endpoint.urls:
        _load_into(base_url, endpoint, name, path, timeout_s)


def _load_into(
    base_url: str, endpoint: EndpointConfig, name: str, path: Path, timeout_s: float
) -> None:
    import httpx

    url = base_url.rstrip("/") + "/load_lora_adapter"
    headers = {"Authorization": f"Bearer {api_key_from_env(endpoint.api_key_env)}"}
    try:
        response = httpx.post(
            url,
            json={"lora_name": name, "lora_path": str(path)},
            headers=headers,
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise BackendError(f"{url}: cannot load adapter {name!r}: {exc}") from exc
    if response.status_code == 200 or "already been loaded" in response.text:
        return
    if response.status_code == 404:
        raise BackendError(
            f"{url}: 404, the server cannot load adapters at run time; start it with "
            "`stepflow serve start` (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True --enable-lora), "
            "or set endpoint.load_adapters: false and serve them with --lora-modules"
        )
    raise BackendError(
        f"{url}: loading adapter {name!r} from {path} failed "
        f"({response.status_code}): {response.text[:500]}"
    )


def warn_short_generation(llm: LLMConfig, agent: str, adapter: Path | None) -> int:
    """Log a warning when `llm.generation.max_new_tokens` cannot hold the longest assistant
    turn the adapter was trained on (its model card) plus a margin; return the tokens
    missing (0 when enough or unknown). Turns cut there end as truncated, unparseable ones."""
    if adapter is None:
        return 0
    limit = llm.generation.max_new_tokens
    missing = generation_shortfall(adapter, limit)
    if missing:
        log.warning(
            "%s: max_new_tokens=%d is %d tokens short of what adapter %s needs (its longest "
            "trained assistant turn is %s tokens, plus a margin of %d): long turns will be "
            "cut and counted as truncated; raise student.generation.max_new_tokens",
            agent,
            limit,
            missing,
            adapter,
            trained_turn_tokens(adapter),
            GENERATION_MARGIN,
        )
    return missing


def with_adapter(
    student: LLMConfig, agent: str, adapter: Path | None
) -> tuple[LLMConfig, Path | None]:
    """The student config and local adapter path that run `agent`.

    Local backend: the adapter is applied in process. Endpoint with `load_adapters`: the
    adapter is loaded into the server and requested by its served name. Endpoint without:
    the server already serves the agent under its own name. A `max_new_tokens` too short
    for the adapter's trained turns is warned about (`warn_short_generation`).
    """
    warn_short_generation(student, agent, adapter)
    if student.backend == "local" or agent == UNTRAINED:
        return student, adapter
    endpoint = student.endpoint
    assert endpoint is not None
    if adapters_preloaded(student):
        name = agent
    else:
        if adapter is None:
            raise FileNotFoundError(f"adapter of agent {agent!r} missing (train it first)")
        name = served_name(agent, adapter)
        load_adapter(endpoint, name, adapter)
    served = endpoint.model_copy(update={"model": name})
    return student.model_copy(update={"endpoint": served}), None
