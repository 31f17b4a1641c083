"""An OpenAI-compatible chat-completions endpoint (vLLM, a hosted model) as a chat backend.

Requests run concurrently up to `endpoint.concurrency`. With several servers listed
(`base_url: [...]`, replicas of the same model), episodes go to them in turn, each episode
staying on one server. Timeouts, connection errors (including a connection closed
mid-answer), 408, 409, 429 and 5xx answers, and answers that are not a chat completion (an
HTML error page, JSON cut short) are retried with exponential backoff and jitter (a
Retry-After header, seconds or a date, sets the wait instead; both capped at 30 s),
`max_retries` times (the client's own retries are off so that every attempt is counted
here); other errors, and the last failed attempt, raise `EndpointError`. The API key is read
from the environment variable named by `endpoint.api_key_env` and is neither logged nor
stored anywhere but in the client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from stepflow.config import EndpointConfig, GenerationConfig
from stepflow.llm.base import BackendError, Completion, Message

log = logging.getLogger(__name__)

# Sent when no key is configured: local servers (vLLM without --api-key) accept anything.
PLACEHOLDER_API_KEY = "EMPTY"
RETRYABLE_STATUS = frozenset({408, 409, 429})


class EndpointError(BackendError):
    """An endpoint request failed for good (after retries, or with a non-retryable error)."""

    def __init__(self, message: str, *, attempts: int, status: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status


class NotACompletion(ValueError):
    """A 200 answer that is not a chat completion (a proxy's error page, a cut document)."""


@dataclass
class EndpointStats:
    """Counters of an endpoint backend since it started."""

    requests: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def api_key_from_env(variable: str | None) -> str:
    """The API key from the named environment variable, or a placeholder when unset."""
    if variable:
        value = os.environ.get(variable)
        if value:
            return value
    return PLACEHOLDER_API_KEY


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(max_s, base_s * 2^attempt)."""
    delay = min(max_s, base_s * (2**attempt))
    return random.uniform(delay / 2, delay)


def _is_retryable(exc: Exception) -> tuple[bool, int | None]:
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True, None
    if isinstance(exc, NotACompletion | json.JSONDecodeError):
        return True, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return status in RETRYABLE_STATUS or status >= 500, status
    return False, None


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110);
    None when absent or unreadable, 0 for a date already past."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retry_after(exc: Exception) -> float | None:
    """The Retry-After delay of a 429/503 answer, if it has one."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    return retry_after_seconds(response.headers.get("retry-after"))


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server (use it within one event loop)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        generation: GenerationConfig | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        from openai import AsyncOpenAI

        self.endpoint = endpoint
        self.name = endpoint.model
        self.generation = generation or GenerationConfig()
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stats = EndpointStats()
        self._semaphore = asyncio.Semaphore(endpoint.concurrency)
        key = api_key_from_env(endpoint.api_key_env)
        self._clients = [
            AsyncOpenAI(api_key=key, base_url=url, timeout=endpoint.timeout_s, max_retries=0)
            for url in endpoint.urls
        ]
        self._turn = itertools.count()
        self._sessions: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.name!r}, base_url={self.endpoint.base_url!r})"

    def _server(self, session: str | None) -> int:
        """The server of a request: servers are used in turn, one per session (episode), so
        a server's prefix cache keeps serving the conversation it has seen."""
        if session is None:
            return next(self._turn) % len(self._clients)
        if session not in self._sessions:
            self._sessions[session] = next(self._turn) % len(self._clients)
        return self._sessions[session]

    def _request(self, messages: list[Message], max_new_tokens: int | None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": messages,
            "max_tokens": max_new_tokens or self.generation.max_new_tokens,
            "temperature": self.generation.temperature,
        }
        if self.generation.temperature > 0:
            request["top_p"] = self.generation.top_p
        return request

    async def complete(
        self,
        messages: list[Message],
        *,
        session: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completion:
        """One chat completion, retried on transient failures."""
        request = self._request(messages, max_new_tokens)
        server = self._server(session)
        client, url = self._clients[server], self.endpoint.urls[server]
        attempts = self.endpoint.max_retries + 1
        self.stats.requests += 1
        async with self._semaphore:
            for attempt in range(attempts):
                self.stats.attempts += 1
                try:
                    response = await client.chat.completions.create(**request)
                    return self._completion(response, url)
                except Exception as exc:
                    retryable, status = _is_retryable(exc)
                    last = attempt == attempts - 1
                    if not retryable or last:
                        self.stats.failures += 1
                        why = f"after {attempt + 1} attempts" if retryable else "not retryable"
                        raise EndpointError(
                            f"{url} model {self.name!r}: {type(exc).__name__}: {exc} ({why})",
                            attempts=attempt + 1,
                            status=status,
                        ) from exc
                    asked = _retry_after(exc)
                    if asked is None:
                        delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s)
                    else:  # the server's wait, capped like the backoff
                        delay = min(asked, self.backoff_max_s)
                    self.stats.retries += 1
                    log.warning(
                        "endpoint %s: %s (attempt %d/%d); retrying in %.2fs",
                        url,
                        type(exc).__name__,
                        attempt + 1,
                        attempts,
                        delay,
                    )
                    await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _completion(self, response: Any, url: str) -> Completion:
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            shown = response if isinstance(response, str) else type(response).__name__
            raise NotACompletion(f"{url}: not a chat completion: {str(shown)[:80]!r}")
        choice = choices[0]
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        cached = getattr(details, "cached_tokens", None) or 0
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        return Completion(
            text=choice.message.content or "",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
        )

    def end_session(self, session: str) -> None:
        """Forget which server the session used (servers cache prefixes themselves)."""
        self._sessions.pop(session, None)

    async def aclose(self) -> None:
        """Close the HTTP clients."""
        for client in self._clients:
            await client.close()
