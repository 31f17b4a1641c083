"""LLM backends behind one interface: a local transformers model or an OpenAI-compatible
endpoint (vLLM, a hosted model); also the vLLM server itself (`serving`) and the embedded
default model (`embedded`)."""

from __future__ import annotations

from pathlib import Path

from stepflow.config import LLMConfig
from stepflow.llm.base import BackendError, ChatBackend, Completion, Message

__all__ = ["BackendError", "ChatBackend", "Completion", "Message", "make_backend"]


def make_backend(config: LLMConfig, adapter: str | Path | None = None, **kwargs) -> ChatBackend:
    """The backend of one LLM role of params.yaml; `adapter` is a LoRA directory (local only).

    Extra keyword arguments go to the backend class (`LocalBackend` or `OpenAIBackend`).
    """
    if config.backend == "local":
        from stepflow.llm.local import LocalBackend

        return LocalBackend.from_config(config, adapter=adapter, **kwargs)
    if config.backend == "openai":
        if adapter is not None:
            raise ValueError(
                "a LoRA adapter path only applies to the local backend; serve the adapter "
                "(vLLM --enable-lora --lora-modules NAME=PATH) and set endpoint.model to NAME"
            )
        from stepflow.llm.endpoint import OpenAIBackend

        assert config.endpoint is not None
        return OpenAIBackend(config.endpoint, config.generation, **kwargs)
    raise ValueError(f"unknown backend {config.backend!r}")
