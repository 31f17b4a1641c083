"""The OpenAI-compatible backend against a real local HTTP server serving the embedded model."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from stepflow.config import EndpointConfig, GenerationConfig, LLMConfig
from stepflow.llm import make_backend
from stepflow.llm.endpoint import (
    PLACEHOLDER_API_KEY,
    EndpointError,
    OpenAIBackend,
    api_key_from_env,
    backoff_delay,
    retry_after_seconds,
)
from stepflow.llm.local import LocalBackend
from tests.servers import (
    KEY,
    KEY_ENV,
    clear_faults,
    forget_requests,
    free_port,
    inject,
    openai_server,
    requests_seen,
)

MAX_NEW = 24
QUESTION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
]
OTHER = [{"role": "user", "content": "Name a metal. Answer in one word."}]


@pytest.fixture(scope="module")
def server(embedded_dir):
    """Base URL of a live OpenAI-compatible server over the embedded model."""
    with openai_server() as root:
        yield root


@pytest.fixture(scope="module")
def local(embedded_dir):
    backend = LocalBackend("embedded")
    yield backend
    backend.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def endpoint(root: str, **overrides) -> EndpointConfig:
    settings = {"base_url": f"{root}/v1", "model": "embedded", "api_key_env": KEY_ENV}
    return EndpointConfig(**{**settings, **overrides})


def run(backend: OpenAIBackend, *conversations: list[dict]):
    """Complete conversations concurrently, then close the client."""

    async def main():
        try:
            return await asyncio.gather(
                *(backend.complete(c, max_new_tokens=MAX_NEW) for c in conversations)
            )
        finally:
            await backend.aclose()

    return asyncio.run(main())


@pytest.mark.slow
def test_same_greedy_text_as_the_local_backend(server, local, key_env) -> None:
    backend = make_backend(
        LLMConfig(backend="openai", endpoint=endpoint(server), generation=GenerationConfig())
    )
    assert isinstance(backend, OpenAIBackend)
    assert backend.name == "embedded"
    answers = run(backend, QUESTION, OTHER, QUESTION)
    expected = [local.complete_sync(c, max_new_tokens=MAX_NEW) for c in (QUESTION, OTHER)]
    assert [a.text for a in answers] == [expected[0].text, expected[1].text, expected[0].text]
    assert "Paris" in answers[0].text
    assert answers[0].prompt_tokens == expected[0].prompt_tokens
    assert answers[0].completion_tokens == expected[0].completion_tokens
    assert backend.stats.attempts == 3


@pytest.mark.slow
def test_transient_errors_are_retried(server, key_env) -> None:
    clear_faults(server)
    forget_requests(server)
    for status in (503, 429, 408, 409):
        inject(server, status=status)
    backend = OpenAIBackend(endpoint(server, max_retries=4), backoff_base_s=0.01)
    (answer,) = run(backend, QUESTION)
    assert "Paris" in answer.text
    assert [r["status"] for r in requests_seen(server)] == [503, 429, 408, 409, 200]
    assert (backend.stats.attempts, backend.stats.retries, backend.stats.failures) == (5, 4, 0)


@pytest.mark.slow
def test_retry_after_is_honoured(server, key_env) -> None:
    clear_faults(server)
    forget_requests(server)
    inject(server, status=429, retry_after=1)
    inject(server, status=503, retry_after=2)
    # backoff alone would wait about 0.01 s, then 0.02 s
    backend = OpenAIBackend(endpoint(server, max_retries=2), backoff_base_s=0.01)
    started = time.monotonic()
    (answer,) = run(backend, QUESTION)
    waited = time.monotonic() - started
    assert "Paris" in answer.text
    seen = requests_seen(server)
    assert [r["status"] for r in seen] == [429, 503, 200]
    first, second, third = (r["at"] for r in seen)
    gaps = [second - first, third - second]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    assert waited >= 3.0
    assert (backend.stats.attempts, backend.stats.retries, backend.stats.failures) == (3, 2, 0)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(" 1.5 ", now) == 1.5
    assert retry_after_seconds("Sun, 29 Nov 2026 12:00:42 GMT", now) == 42.0
    assert retry_after_seconds("Sun, 29 Nov 2026 11:59:00 GMT", now) == 0.0  # already past
    assert retry_after_seconds("-3", now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


@pytest.mark.slow
def test_retry_after_as_a_date_is_honoured_and_a_long_one_capped(server, key_env) -> None:
    clear_faults(server)
    forget_requests(server)
    in_three_seconds = format_datetime(datetime.now(UTC) + timedelta(seconds=3), True)
    inject(server, status=503, retry_after=in_three_seconds)
    inject(server, status=429, retry_after=3600)  # an hour: capped at the backoff maximum
    backend = OpenAIBackend(endpoint(server, max_retries=2), backoff_base_s=0.01, backoff_max_s=1.0)
    (answer,) = run(backend, QUESTION)
    assert "Paris" in answer.text
    first, second, third = (r["at"] for r in requests_seen(server))
    # the date asks for 2-3 s (whole seconds), capped at 1 s; the hour is capped at 1 s too
    assert 0.9 <= second - first < 2.0, second - first
    assert 0.9 <= third - second < 2.0, third - second


@pytest.mark.slow
def test_gives_up_after_max_retries(server, key_env) -> None:
    inject(server, count=3, status=500)
    backend = OpenAIBackend(endpoint(server, max_retries=2), backoff_base_s=0.01)
    with pytest.raises(EndpointError, match="after 3 attempts") as info:
        run(backend, QUESTION)
    assert info.value.attempts == 3
    assert info.value.status == 500


@pytest.mark.slow
@pytest.mark.parametrize("body", ["non_json", "truncated_json", "cut"])
def test_answers_that_are_not_completions_are_retried(server, key_env, body) -> None:
    inject(server, count=1, body=body)
    backend = OpenAIBackend(endpoint(server, max_retries=1), backoff_base_s=0.01)
    (answer,) = run(backend, QUESTION)
    assert "Paris" in answer.text
    assert (backend.stats.attempts, backend.stats.retries) == (2, 1)
    inject(server, count=2, body=body)
    backend = OpenAIBackend(endpoint(server, max_retries=1), backoff_base_s=0.01)
    with pytest.raises(EndpointError, match="after 2 attempts"):
        run(backend, QUESTION)


@pytest.mark.slow
def test_timeouts_are_retried(server, key_env) -> None:
    inject(server, count=1, delay_s=30.0)
    backend = OpenAIBackend(endpoint(server, max_retries=1, timeout_s=8.0), backoff_base_s=0.01)
    (answer,) = run(backend, QUESTION)
    assert "Paris" in answer.text
    assert backend.stats.attempts == 2


@pytest.mark.slow
def test_client_errors_are_not_retried(server, key_env) -> None:
    backend = OpenAIBackend(endpoint(server, model="no-such-model"), backoff_base_s=0.01)
    with pytest.raises(EndpointError, match="not retryable") as info:
        run(backend, QUESTION)
    assert (info.value.attempts, info.value.status) == (1, 404)


@pytest.mark.slow
def test_api_key_comes_from_the_env_and_is_never_logged(server, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    backend = OpenAIBackend(endpoint(server), backoff_base_s=0.01)
    with pytest.raises(EndpointError) as info:
        run(backend, QUESTION)
    assert info.value.status == 401
    assert "wrong-key" not in str(info.value)
    assert "wrong-key" not in repr(backend)
    monkeypatch.delenv(KEY_ENV)
    backend = OpenAIBackend(endpoint(server), backoff_base_s=0.01)
    with pytest.raises(EndpointError):
        run(backend, QUESTION)
    monkeypatch.setenv(KEY_ENV, KEY)
    inject(server, count=1, status=502)
    backend = OpenAIBackend(endpoint(server, max_retries=1), backoff_base_s=0.01)
    run(backend, QUESTION)
    assert KEY not in caplog.text


def test_unreachable_server_fails_after_retries() -> None:
    config = EndpointConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", api_key_env=None, max_retries=2
    )
    backend = OpenAIBackend(config, backoff_base_s=0.01)
    with pytest.raises(EndpointError, match="APIConnectionError") as info:
        run(backend, QUESTION)
    assert info.value.attempts == 3
    assert backend.stats.retries == 2


def test_api_key_placeholder_and_backoff(monkeypatch) -> None:
    monkeypatch.delenv("STEPFLOW_UNSET_KEY_VAR", raising=False)
    assert api_key_from_env("STEPFLOW_UNSET_KEY_VAR") == PLACEHOLDER_API_KEY
    assert api_key_from_env(None) == PLACEHOLDER_API_KEY
    monkeypatch.setenv("STEPFLOW_SET_KEY_VAR", "k")
    assert api_key_from_env("STEPFLOW_SET_KEY_VAR") == "k"
    delays = [backoff_delay(attempt, 0.5, 4.0) for attempt in range(6)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(2.0 <= d <= 4.0 for d in delays[3:])


def test_adapter_path_is_refused_for_endpoints() -> None:
    config = LLMConfig(backend="openai", endpoint=EndpointConfig(model="m"))
    with pytest.raises(ValueError, match="enable-lora"):
        make_backend(config, adapter=Path("adapter"))


@pytest.mark.slow
def test_the_prompt_budget_comes_from_the_server_when_the_config_is_not_here(
    server, key_env
) -> None:
    from stepflow.agent.context import context_budget

    remote = LLMConfig(
        backend="openai", model="no-such-org/not-on-this-machine", endpoint=endpoint(server)
    )
    # the test server reports the embedded model's 8192 positions, as vLLM its max_model_len
    assert context_budget(None, remote, 100, "teacher.max_context_tokens") == 8192 - 100
    assert context_budget(2048, remote, 100, "teacher.max_context_tokens") == 2048 - 100
    dead = remote.model_copy(
        update={"endpoint": endpoint(f"http://127.0.0.1:{free_port()}", model="x")}
    )
    with pytest.raises(ValueError, match=r"teacher.max_context_tokens is null .* its server"):
        context_budget(None, dead, 100, "teacher.max_context_tokens")
