"""The interface every LLM backend implements: chat messages in, text and token counts out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Message = dict[str, str]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One generated assistant turn.

    `cached_tokens` is the part of the prompt whose attention state was reused rather
    than computed again (0 when the backend does not say).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finish_reason: FinishReason = "stop"


@runtime_checkable
class ChatBackend(Protocol):
    """A chat model. `session` groups the calls of one conversation (e.g. one episode) so
    a backend may reuse work across its turns; `end_session` releases that state."""

    name: str

    async def complete(
        self,
        messages: list[Message],
        *,
        session: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completion:
        """Generate the next assistant turn for `messages`."""
        ...

    def end_session(self, session: str) -> None:
        """Forget the state kept for `session` (no-op when there is none)."""
        ...

    async def aclose(self) -> None:
        """Release the backend's resources (threads, connections)."""
        ...


class BackendError(RuntimeError):
    """A backend could not produce a completion."""
