"""Reusing the attention (KV) cache of a conversation across its turns.

Each session keeps the token ids it has seen (prompt + generated turn) and the KV cache of
those tokens. The next prompt of the session usually starts with the same tokens, but not
always all of them: the stored assistant turn may have been re-formatted, and a generated
token sequence may re-tokenize differently. So the reusable part is the longest common token
prefix, never the whole stored sequence.

A session seen for the first time starts from the stored state that shares the longest
prefix with its prompt (the system prompt and task preamble every episode begins with), so
that prefix is encoded once for all episodes rather than once per episode. Caches are only
read when a batch is assembled, so one state can seed any number of sessions.

Several sessions are decoded together in one left-padded batch: each row's cached prefix is
left-padded to a common width, so that every row's new tokens start at the same column.
Positions come from the attention mask, so a row's cached keys (computed at positions
0..n-1) stay valid whatever padding surrounds them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


def cache_length(cache: DynamicCache) -> int:
    """Number of positions held by a cache."""
    return int(cache.get_seq_length())


def supports_prefix_reuse(cache: DynamicCache) -> bool:
    """Only full-attention layers can be cut to a prefix (not sliding-window or recurrent)."""
    return not any(cache.is_sliding) and not any(cache.is_linear)


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty cache for a model."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def assemble_batch_cache(
    config: PretrainedConfig, rows: list[tuple[DynamicCache | None, int]], width: int
) -> DynamicCache:
    """One batch cache from per-row caches: row `i` contributes its first `n_i` positions,
    left-padded with zeros to `width` (the padded positions are masked out)."""
    import torch
    import torch.nn.functional as F

    batch = new_cache(config)
    if width == 0:
        return batch
    template = next(cache for cache, used in rows if cache is not None and used > 0)
    for index, layer in enumerate(template.layers):
        keys, values = [], []
        for cache, used in rows:
            if cache is not None and used > 0:
                k = cache.layers[index].keys[..., :used, :]
                v = cache.layers[index].values[..., :used, :]
            else:
                k = layer.keys[..., :0, :]
                v = layer.values[..., :0, :]
            pad = width - k.shape[-2]
            keys.append(F.pad(k, (0, 0, pad, 0)))
            values.append(F.pad(v, (0, 0, pad, 0)))
        batch.update(torch.cat(keys), torch.cat(values), index)
    return batch


def extract_row_cache(
    config: PretrainedConfig, batch: DynamicCache, row: int, start: int, length: int
) -> DynamicCache:
    """The cache of one batch row: `length` positions from column `start` (a private copy)."""
    single = new_cache(config)
    for index, layer in enumerate(batch.layers):
        keys = layer.keys[row : row + 1, :, start : start + length, :].clone()
        values = layer.values[row : row + 1, :, start : start + length, :].clone()
        single.update(keys, values, index)
    return single


@dataclass
class SessionState:
    """What a session has seen: its token ids and the KV cache of (a prefix of) them."""

    ids: list[int]
    cache: DynamicCache

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` can come from this cache (at least one
        token is always left to encode, so the model yields logits for it)."""
        shared = common_prefix_length(self.ids, prompt)
        return max(0, min(shared, cache_length(self.cache), len(prompt) - 1))


class SessionStore:
    """Session states, least recently used evicted first; safe to use from several threads."""

    def __init__(self, max_sessions: int = 64) -> None:
        self.max_sessions = max_sessions
        self._states: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: str) -> SessionState | None:
        """The state of a session, if kept."""
        with self._lock:
            state = self._states.get(session)
            if state is not None:
                self._states.move_to_end(session)
            return state

    def put(self, session: str, state: SessionState) -> None:
        """Keep the state of a session, evicting the oldest beyond `max_sessions`."""
        with self._lock:
            self._states[session] = state
            self._states.move_to_end(session)
            while len(self._states) > self.max_sessions:
                self._states.popitem(last=False)

    def longest_prefix(self, prompt: list[int]) -> tuple[SessionState | None, int]:
        """The kept state that can supply the most leading tokens of `prompt`, and how many."""
        with self._lock:
            states = list(self._states.values())
        best, best_length = None, 0
        for state in states:
            if not state.ids or state.ids[0] != (prompt[0] if prompt else None):
                continue
            length = state.reusable(prompt)
            if length > best_length:
                best, best_length = state, length
        return best, best_length

    def drop(self, session: str) -> None:
        """Forget a session."""
        with self._lock:
            self._states.pop(session, None)

    def clear(self) -> None:
        """Forget every session."""
        with self._lock:
            self._states.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)
