"""A local transformers model as a chat backend.

One worker thread owns the model and drains a request queue: requests that arrive while it
is busy are decoded together in one left-padded `generate` call (on a CPU, batching is where
throughput comes from). Within a session (one episode) the KV cache of the conversation
prefix is kept between turns, so a turn only encodes the tokens that are new; a new session
starts from the longest prefix (e.g. the shared system prompt) another session has encoded.

Over 300 lines, one module: the batching worker, its KV-cache sessions and generation share
the one thread's state that owns the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepflow.config import GenerationConfig, LLMConfig
from stepflow.llm.base import BackendError, Completion, Message
from stepflow.llm.kv_cache import (
    SessionState,
    SessionStore,
    assemble_batch_cache,
    cache_length,
    extract_row_cache,
    new_cache,
    supports_prefix_reuse,
)

if TYPE_CHECKING:
    import torch
    from transformers import (
        DynamicCache,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )
    from transformers import GenerationConfig as HFGenerationConfig

log = logging.getLogger(__name__)

# End-of-turn tokens of common chat templates; generation stops at any that the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_STOP = object()


@dataclass
class _Request:
    ids: list[int]
    session: str | None
    max_new_tokens: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BackendStats:
    """Counters of a local backend since it started."""

    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    new_prompt_tokens: int = 0  # prompt tokens not found in a cache
    prefill_tokens: int = 0  # prompt positions encoded (new tokens plus batch padding)
    generate_s: float = 0.0  # wall time of batch assembly, prefill, decode and detokenising
    prefill_s: float = 0.0  # encoding prompts, up to the first generated token of a batch
    decode_s: float = 0.0  # generating the tokens after the first

    @property
    def mean_batch_size(self) -> float:
        """Requests per `generate` call."""
        return self.requests / self.batches if self.batches else 0.0


class FirstTokenClock:
    """A stopping criterion that stops nothing: it notes when `generate` produced its first
    token, which divides a call's time into prefill and decode."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        import torch

        if self.first is None:
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class LocalBackend:
    """A transformers causal LM with a chat template, served by one worker thread.

    With a single request and no reusable cache, a call is exactly `model.generate` on the
    full prompt. Reused caches and batching change only the shapes of the matrix products:
    outputs agree up to floating-point rounding, so a near-tie between two tokens could in
    principle flip a greedy choice (not observed on the prompts the tests pin).
    """

    def __init__(
        self,
        model: str = "embedded",
        *,
        generation: GenerationConfig | None = None,
        dtype: str = "auto",
        adapter: str | Path | None = None,
        reuse_cache: bool = True,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        max_sessions: int = 64,
        lm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        from stepflow.train.modeling import load_model, load_tokenizer

        self.name = model if adapter is None else f"{model}+{Path(adapter).name}"
        self.generation = generation or GenerationConfig()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.model = (
            lm if lm is not None else load_model(model, method="full", dtype=dtype, adapter=adapter)
        )
        self.model.eval()
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.stop_token_ids = self._stop_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id
        self.sessions = SessionStore(max_sessions)
        self.reuse_cache = reuse_cache and supports_prefix_reuse(new_cache(self._config))
        self.stats = BackendStats()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="stepflow-llm", daemon=True)
        self._worker.start()

    @classmethod
    def from_config(
        cls, config: LLMConfig, adapter: str | Path | None = None, **kwargs: Any
    ) -> LocalBackend:
        """A backend for one LLM role of params.yaml."""
        return cls(
            config.model,
            generation=config.generation,
            dtype=config.dtype,
            adapter=adapter,
            **kwargs,
        )

    @property
    def _config(self) -> PretrainedConfig:
        return self.model.config

    def _stop_token_ids(self) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
        return sorted(i for i in ids if i is not None)

    # -- public API ------------------------------------------------------------------------
    def encode(self, messages: list[Message]) -> list[int]:
        """Prompt token ids: the chat template with the assistant generation prompt."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(
        self,
        messages: list[Message],
        *,
        session: str | None = None,
        max_new_tokens: int | None = None,
    ) -> concurrent.futures.Future:
        """Queue a request; the future resolves to a Completion."""
        if self._closed:
            raise BackendError("backend is closed")
        request = _Request(
            ids=self.encode(messages),
            session=session,
            max_new_tokens=max_new_tokens or self.generation.max_new_tokens,
        )
        self._queue.put(request)
        return request.future

    async def complete(
        self,
        messages: list[Message],
        *,
        session: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completion:
        """Generate the next assistant turn (batched with concurrent calls)."""
        future = self.submit(messages, session=session, max_new_tokens=max_new_tokens)
        return await asyncio.wrap_future(future)

    def complete_sync(
        self,
        messages: list[Message],
        *,
        session: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completion:
        """Blocking `complete`."""
        return self.submit(messages, session=session, max_new_tokens=max_new_tokens).result()

    def end_session(self, session: str) -> None:
        """Drop the cached conversation state of a session."""
        self.sessions.drop(session)

    def close(self) -> None:
        """Stop the worker (pending requests are still answered) and drop every session."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._worker.join()
        self.sessions.clear()

    async def aclose(self) -> None:
        """Async `close`."""
        await asyncio.to_thread(self.close)

    # -- worker ----------------------------------------------------------------------------
    def _next_batch(self) -> tuple[list[_Request], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, stop = [first], False
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 1e-6))
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _serve(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._generate(live)
            except Exception as exc:
                log.exception("generation failed for a batch of %d", len(live))
                for request in live:
                    request.future.set_exception(BackendError(f"generation failed: {exc}"))
                continue
            for request, result in zip(live, results, strict=True):
                request.future.set_result(result)

    def _generation_config(self, max_new_tokens: int) -> HFGenerationConfig:
        from transformers import GenerationConfig as HFGenerationConfig

        settings: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if self.generation.temperature > 0:
            settings.update(
                do_sample=True, temperature=self.generation.temperature, top_p=self.generation.top_p
            )
        else:
            settings["do_sample"] = False
        return HFGenerationConfig(**settings)

    def _encode_prefix(
        self, ids: list[int], cache: DynamicCache | None, start: int, end: int
    ) -> DynamicCache:
        """A new cache: the first `start` positions of `cache`, then `ids[start:end]` encoded."""
        import torch

        extended = assemble_batch_cache(self._config, [(cache, start)], start)
        with torch.inference_mode():
            self.model(
                input_ids=torch.tensor([ids[start:end]], device=self.model.device),
                cache=extended,
                use_cache=True,
                logits_to_keep=1,
            )
        return extended

    def _generate(self, batch: list[_Request]) -> list[Completion]:
        """Decode a batch of requests in one `generate` call, reusing session caches."""
        import torch
        from transformers import StoppingCriteriaList

        started = time.perf_counter()

        caches: list[DynamicCache | None] = []
        reusable: list[int] = []
        seen: set[str] = set()
        for request in batch:
            state, length = None, 0
            if self.reuse_cache and request.session and request.session not in seen:
                state = self.sessions.get(request.session)
                length = state.reusable(request.ids) if state else 0
                seen.add(request.session)
            if self.reuse_cache and state is None:
                # a new conversation: start from the longest prefix another one has encoded
                state, length = self.sessions.longest_prefix(request.ids)
            caches.append(state.cache if state else None)
            reusable.append(length)
        new_tokens = [len(r.ids) - n for r, n in zip(batch, reusable, strict=True)]
        if self.reuse_cache:
            # Every row of one `generate` call gets the same number of new input columns. A
            # row with more new tokens than the shortest first encodes its excess alone, so
            # no row pays for another's long prompt (a new episode beside running ones).
            new_width = min(new_tokens)
            for row, request in enumerate(batch):
                end = len(request.ids) - new_width
                if end > reusable[row]:
                    caches[row] = self._encode_prefix(request.ids, caches[row], reusable[row], end)
                    self.stats.prefill_tokens += end - reusable[row]
        else:  # a row with fewer new tokens re-encodes the tail of its prefix
            new_width = max(new_tokens)
        used = [max(0, len(r.ids) - new_width) for r in batch]
        cached = [min(u, n) for u, n in zip(used, reusable, strict=True)]
        cache_width = max(used)
        width = cache_width + new_width
        cache = assemble_batch_cache(
            self._config, list(zip(caches, used, strict=True)), cache_width
        )
        self.stats.prefill_tokens += len(batch) * new_width
        self.stats.new_prompt_tokens += sum(new_tokens)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.ids) :] = torch.tensor(request.ids)
            attention[row, width - len(request.ids) :] = 1
        limit = max(r.max_new_tokens for r in batch)
        clock = FirstTokenClock()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.model.device),
                attention_mask=attention.to(self.model.device),
                cache=cache,
                generation_config=self._generation_config(limit),
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        generated_at = time.perf_counter()
        first = clock.first or generated_at
        self.stats.prefill_s += first - started  # the excess encodings above included
        self.stats.decode_s += generated_at - first
        elapsed = time.perf_counter() - started
        steps = output.shape[1] - width
        cached_positions = cache_length(cache)
        results = []
        stop_ids = set(self.stop_token_ids)
        for row, request in enumerate(batch):
            generated = output[row, width:].tolist()[: request.max_new_tokens]
            end = next((i + 1 for i, t in enumerate(generated) if t in stop_ids), None)
            finish = "stop" if end is not None else "length"
            generated = generated[:end] if end is not None else generated
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if self.reuse_cache and request.session and (steps > 0):
                seen_ids = request.ids + generated
                start = width - len(request.ids)
                keep = min(len(seen_ids), cached_positions - start)
                self.sessions.put(
                    request.session,
                    SessionState(
                        ids=seen_ids,
                        cache=extract_row_cache(self._config, cache, row, start, keep),
                    ),
                )
            results.append(
                Completion(
                    text=text,
                    prompt_tokens=len(request.ids),
                    completion_tokens=len(generated),
                    cached_tokens=cached[row],
                    finish_reason=finish,
                )
            )
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.prompt_tokens += sum(len(r.ids) for r in batch)
        self.stats.cached_tokens += sum(cached)
        self.stats.completion_tokens += sum(c.completion_tokens for c in results)
        self.stats.generate_s += elapsed
        return results
