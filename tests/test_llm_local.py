"""The local transformers backend: KV-cache reuse across turns, batching, stops, adapters.

Reference outputs come from plain `model.generate` on the full prompt, one prompt at a time.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from stepflow.agent.prompts import format_observation, format_step, system_prompt
from stepflow.llm import make_backend
from stepflow.llm.base import ChatBackend
from stepflow.llm.kv_cache import common_prefix_length
from stepflow.llm.local import LocalBackend

MAX_NEW = 32
SYSTEM = {"role": "system", "content": system_prompt("scienceworld")}
FIRST = {
    "role": "user",
    "content": "Task: Your task is to find a(n) non-living thing. First, focus on the thing. "
    "Then, move it to the green box in the kitchen.\n"
    "Observation: This room is called the kitchen. In it, you see: a fridge, a table, "
    "a chair, a green box, a door to the hallway (that is open).",
}


@pytest.fixture(scope="module")
def backend(embedded_dir):
    local = LocalBackend("embedded")
    yield local
    local.close()


def plain_generate(backend: LocalBackend, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy `generate` on the full prompt, no cache reuse, no batching."""
    ids = backend.encode(messages)
    with torch.inference_mode():
        out = backend.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=backend.stop_token_ids,
            pad_token_id=backend.pad_token_id,
        )
    return backend.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_backend_implements_the_protocol(backend) -> None:
    assert isinstance(backend, ChatBackend)
    assert backend.name == "embedded"
    assert backend.tokenizer.convert_tokens_to_ids("<|im_end|>") in backend.stop_token_ids


def test_kv_cache_reuse_gives_the_same_greedy_output(backend) -> None:
    session = "scienceworld/find-non-living-thing/1"
    messages = [SYSTEM, FIRST]
    observations = [
        "This room is called the kitchen. In it, you see: a fridge, a table, a chair.",
        "No known action matches that input.",
        "You move to the hallway.",
    ]
    for turn, observation in enumerate([*observations, None]):
        before = backend.sessions.get(session)
        stored = list(before.ids) if before else []
        completion = backend.complete_sync(messages, session=session, max_new_tokens=MAX_NEW)
        assert completion.text == plain_generate(backend, messages, MAX_NEW), f"turn {turn}"
        prompt = backend.encode(messages)
        assert completion.prompt_tokens == len(prompt)
        if turn == 0:
            assert completion.cached_tokens == 0
        else:
            assert 0 < completion.cached_tokens < len(prompt)
            assert completion.cached_tokens == min(
                common_prefix_length(stored, prompt), len(stored) - 1
            )
        if turn == 1:
            # the stored turn 1 was re-formatted: the prefix differs inside the history
            assert completion.cached_tokens < len(stored) - 1
        if observation is None:
            break
        # turn 1 is stored re-formatted (as the rollout does), the others verbatim
        content = format_step("I should try something else", "look around")
        assistant = content if turn == 0 else completion.text
        messages = [
            *messages,
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": format_observation(observation)},
        ]
    backend.end_session(session)
    assert backend.sessions.get(session) is None


def test_a_new_episode_starts_from_the_prefix_another_one_encoded(backend) -> None:
    other_task = {
        "role": "user",
        "content": FIRST["content"].replace("non-living thing", "living thing"),
    }
    first = backend.complete_sync([SYSTEM, FIRST], session="episode-1", max_new_tokens=MAX_NEW)
    shared = common_prefix_length(
        backend.encode([SYSTEM, FIRST]), backend.encode([SYSTEM, other_task])
    )
    assert shared > len(backend.encode([SYSTEM])) // 2  # the system prompt at least
    second = backend.complete_sync(
        [SYSTEM, other_task], session="episode-2", max_new_tokens=MAX_NEW
    )
    assert first.cached_tokens == 0 or backend.sessions.get("episode-1") is not None
    assert second.cached_tokens == shared
    assert second.text == plain_generate(backend, [SYSTEM, other_task], MAX_NEW)
    unrelated = [{"role": "user", "content": "Name a colour. Answer in one word."}]
    third = backend.complete_sync(unrelated, session="episode-3", max_new_tokens=MAX_NEW)
    system_tokens = common_prefix_length(backend.encode(unrelated), backend.encode([SYSTEM, FIRST]))
    assert third.cached_tokens == system_tokens < shared
    for session in ("episode-1", "episode-2", "episode-3"):
        backend.end_session(session)


def test_batched_requests_return_each_their_own_text(backend) -> None:
    prompts = [
        [SYSTEM, FIRST],
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        [
            SYSTEM,
            FIRST,
            {"role": "assistant", "content": format_step("Look first.", "look around")},
            {"role": "user", "content": format_observation("You see a fridge and a chair.")},
        ],
    ]
    expected = [plain_generate(backend, p, MAX_NEW) for p in prompts]
    batches_before = backend.stats.batches
    before = dict(vars(backend.stats))
    backend.batch_wait_s = 1.0
    try:
        futures = [backend.submit(p, max_new_tokens=MAX_NEW) for p in prompts]
        results = [f.result() for f in futures]
    finally:
        backend.batch_wait_s = 0.005
    assert backend.stats.batches == batches_before + 1
    # Left padding changes the shapes of the matrix products; on this CPU the greedy
    # outputs stay identical for these prompts (a near-tie could in principle flip a token).
    assert [r.text for r in results] == expected
    assert "Paris" in results[1].text
    # no row pays for another's longer prompt: only the new tokens are encoded
    new_tokens = sum(r.prompt_tokens - r.cached_tokens for r in results)
    assert backend.stats.new_prompt_tokens - before["new_prompt_tokens"] == new_tokens
    assert backend.stats.prefill_tokens - before["prefill_tokens"] == new_tokens
    assert max(r.prompt_tokens for r in results) > 3 * min(r.prompt_tokens for r in results)


def test_concurrent_sessions_with_cached_prefixes_batch_correctly(backend) -> None:
    first = [SYSTEM, FIRST]
    other = [{"role": "user", "content": "Name a metal. Answer in one word."}]

    async def turn(messages: list[dict], session: str) -> str:
        return (await backend.complete(messages, session=session, max_new_tokens=MAX_NEW)).text

    async def two_turns() -> tuple[list[str], list[list[dict]]]:
        a, b = await asyncio.gather(turn(first, "a"), turn(other, "b"))
        second_a = [*first, {"role": "assistant", "content": a}, FOLLOW_UP]
        second_b = [*other, {"role": "assistant", "content": b}, FOLLOW_UP]
        texts = await asyncio.gather(turn(second_a, "a"), turn(second_b, "b"))
        return list(texts), [second_a, second_b]

    texts, prompts = asyncio.run(two_turns())
    assert texts == [plain_generate(backend, p, MAX_NEW) for p in prompts]
    for session in ("a", "b"):
        backend.end_session(session)


FOLLOW_UP = {"role": "user", "content": format_observation("Nothing happens.")}


def test_stops_at_end_of_turn_or_length(backend) -> None:
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    done = backend.complete_sync(question, max_new_tokens=MAX_NEW)
    assert done.finish_reason == "stop"
    assert done.completion_tokens < MAX_NEW
    assert "<|im_end|>" not in done.text
    cut = backend.complete_sync([SYSTEM, FIRST], max_new_tokens=3)
    assert cut.finish_reason == "length"
    assert cut.completion_tokens == 3


def test_a_calls_time_divides_into_prefill_and_decode(embedded_dir) -> None:
    """The first generated token ends the prefill: a one-token answer is all prefill, and
    tokens after the first add decode time only."""
    fresh = LocalBackend("embedded", reuse_cache=False)
    try:
        fresh.complete_sync([SYSTEM, FIRST], max_new_tokens=1)
        one = fresh.stats.prefill_s, fresh.stats.decode_s
        fresh.complete_sync([SYSTEM, FIRST], max_new_tokens=24)
        more = fresh.stats.prefill_s - one[0], fresh.stats.decode_s - one[1]
    finally:
        fresh.close()
    assert one[0] > 0 and one[1] < one[0] / 10
    assert more[1] > one[1] and more[1] > 0
    assert fresh.stats.prefill_s + fresh.stats.decode_s <= fresh.stats.generate_s


def test_lora_adapter_is_applied(tmp_path, embedded_dir) -> None:
    from peft import LoraConfig, get_peft_model

    from stepflow.config import LLMConfig
    from stepflow.train.modeling import load_model

    base = load_model("embedded")
    lora = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "adapter")
    adapted = make_backend(LLMConfig(), adapter=tmp_path / "adapter")
    try:
        assert adapted.name == "embedded+adapter"
        messages = [SYSTEM, FIRST]
        first = adapted.complete_sync(messages, session="s", max_new_tokens=8)
        assert first.text == plain_generate(adapted, messages, 8)
        follow = [*messages, {"role": "assistant", "content": first.text}, FOLLOW_UP]
        second = adapted.complete_sync(follow, session="s", max_new_tokens=8)
        assert second.cached_tokens > 0
        assert second.text == plain_generate(adapted, follow, 8)
    finally:
        adapted.close()


def test_threads_loading_the_agent_at_once_get_the_whole_model(tmp_path, embedded_dir) -> None:
    """Shards on a thread runner load their agents in one process at the same time;
    transformers' loading is not thread-safe ("Cannot copy out of meta tensor", weights
    left uninitialised) unless loads are serialised."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from peft import LoraConfig, get_peft_model

    from stepflow.train.modeling import load_model

    lora = get_peft_model(
        load_model("embedded"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "adapter")
    reference = load_model("embedded", adapter=tmp_path / "adapter").state_dict()
    together = Barrier(2)

    def load():
        together.wait()
        return load_model("embedded", adapter=tmp_path / "adapter")

    for _ in range(2):
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(load) for _ in range(2)]
            models = [f.result() for f in futures]
        for model in models:
            state = model.state_dict()
            assert state.keys() == reference.keys()
            assert all(torch.equal(state[k], reference[k]) for k in reference)
