"""Partial masking is exact at the token level, for ChatML and for other chat templates.

The expected trained tokens are computed independently of stepflow.train.masking: the whole
conversation is rendered as text, each trained turn's content is located in it by string
search, its span is extended to the end of the end-of-turn string that follows, and the
expected tokens are those whose character offsets overlap such a span.
"""

from __future__ import annotations

import copy

import pytest

from stepflow.data.trajectory import Trajectory
from stepflow.train.examples import build_examples
from stepflow.train.masking import IGNORE_INDEX, TemplateError, tokenize_trajectory
from tests.sample_trajectories import (
    golden_find_non_living,
    golden_lifespan,
    reflected_find_non_living,
    sample_set,
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns_system = message['content'] %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# ChatML that tags the last assistant message: a turn renders differently once more follow.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if loop.last and m['role'] == 'assistant' %}(latest) {% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML that leaves the last message open: an assistant turn has no end-of-turn token.
OPEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}"
)


def expected_trained(
    trajectory: Trajectory, tokenizer, end_text: str, mask_erroneous: bool = True
) -> tuple[list[int], set[int]]:
    """Token ids of the rendered conversation and the positions that should be trained."""
    messages = [{"role": t.role, "content": t.content} for t in trajectory.turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    cursor = 0
    for turn in trajectory.turns:
        if turn.role != "assistant":
            continue
        start = text.index(turn.content, cursor)
        end = text.index(end_text, start + len(turn.content)) + len(end_text)
        cursor = end
        if turn.loss or (turn.kind == "erroneous_step" and not mask_erroneous):
            spans.append((start, end))
    positions = {
        j
        for j, (a, b) in enumerate(encoded["offset_mapping"])
        if any(a < end and b > start for start, end in spans)
    }
    return list(encoded["input_ids"]), positions


def with_template(tokenizer, template: str, extra_tokens: list[str] | None = None):
    """A copy of the embedded tokenizer with another chat template."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    if extra_tokens:
        other.add_special_tokens({"additional_special_tokens": extra_tokens})
    return other


@pytest.mark.parametrize("mask_erroneous", [True, False])
@pytest.mark.parametrize("trajectory", sample_set(), ids=lambda t: t.key)
def test_chatml_trained_tokens_are_exactly_the_loss_turns(
    tokenizer, trajectory: Trajectory, mask_erroneous: bool
) -> None:
    ids, expected = expected_trained(trajectory, tokenizer, "<|im_end|>", mask_erroneous)
    result = tokenize_trajectory(trajectory, tokenizer, mask_erroneous=mask_erroneous)
    assert expected, "every sample trajectory has a turn to train"
    assert result.input_ids == ids
    assert result.trained_positions() == expected
    assert all(result.labels[i] == ids[i] for i in expected)
    # one span per assistant turn, in order
    assistant = [i for i, t in enumerate(trajectory.turns) if t.role == "assistant"]
    assert assistant and [s.turn_index for s in result.spans] == assistant
    # each assistant turn ends on <|im_end|>; the "\n" after it is context
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for span in result.spans:
        assert result.input_ids[span.train_end - 1] == im_end
        assert tokenizer.decode(result.input_ids[span.train_end : span.end]) == "\n"
        assert result.labels[span.train_end] == IGNORE_INDEX


def test_llama2_template_trained_tokens(tokenizer) -> None:
    llama = with_template(tokenizer, LLAMA2_TEMPLATE)
    trajectories = sample_set()
    assert len(trajectories) == 3
    for trajectory in trajectories:
        for mask_erroneous in (True, False):
            ids, expected = expected_trained(trajectory, llama, llama.eos_token, mask_erroneous)
            result = tokenize_trajectory(trajectory, llama, mask_erroneous=mask_erroneous)
            assert expected, trajectory.key
            assert result.input_ids == ids
            assert result.trained_positions() == expected
    rendered = llama.decode(result.input_ids)
    assert "[INST] <<SYS>>" in rendered and "[/INST] Thought:" in rendered


def test_gemma_style_template_with_explicit_end_of_turn(tokenizer) -> None:
    gemma = with_template(tokenizer, GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"])
    end_id = gemma.convert_tokens_to_ids("<end_of_turn>")
    trajectory = reflected_find_non_living()
    with pytest.raises(TemplateError, match="not closed by an end-of-turn token"):
        tokenize_trajectory(trajectory, gemma)
    ids, expected = expected_trained(trajectory, gemma, "<end_of_turn>")
    result = tokenize_trajectory(trajectory, gemma, end_token_ids=[end_id])
    assert expected
    assert result.input_ids == ids
    assert result.trained_positions() == expected
    assert "<start_of_turn>model\n" in gemma.decode(result.input_ids)


@pytest.mark.parametrize(
    ("template", "problem"),
    [(UNSTABLE_TEMPLATE, "not prefix-stable"), (OPEN_TEMPLATE, "not closed by an end-of-turn")],
)
def test_templates_without_exact_boundaries_are_rejected(
    tokenizer, template: str, problem: str
) -> None:
    with pytest.raises(TemplateError, match=problem):
        tokenize_trajectory(golden_find_non_living(), with_template(tokenizer, template))


def test_partial_masking_keeps_erroneous_steps_as_context(tokenizer) -> None:
    trajectory = reflected_find_non_living()
    masked = tokenize_trajectory(trajectory, tokenizer, mask_erroneous=True)
    unmasked = tokenize_trajectory(trajectory, tokenizer, mask_erroneous=False)
    assert masked.input_ids == unmasked.input_ids
    erroneous = {
        pos
        for span in unmasked.spans
        if span.kind == "erroneous_step"
        for pos in range(span.start, span.train_end)
    }
    assert len([s for s in masked.spans if s.kind == "erroneous_step"]) == 2
    assert erroneous and not erroneous & masked.trained_positions()
    assert unmasked.trained_positions() == masked.trained_positions() | erroneous
    reflections = [s for s in masked.spans if s.kind == "reflection"]
    assert reflections and all(s.trained for s in reflections)
    first = tokenizer.decode(masked.input_ids[reflections[0].start : reflections[0].train_end])
    assert first.startswith("Reflection: Looking at the picture")
    assert first.endswith("Action: go to kitchen<|im_end|>")


def test_truncation_and_dropping_are_counted(tokenizer) -> None:
    trajectories = sample_set()
    full = [tokenize_trajectory(t, tokenizer) for t in trajectories]
    needed = [max(f.trained_positions()) + 1 for f in full]
    limit = sorted(needed)[1]  # the shortest two fit, the longest does not
    over = sum(1 for n in needed if n > limit)
    assert over == 1

    examples, stats = build_examples(
        trajectories, tokenizer, max_seq_len=limit, truncation="truncate"
    )
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped) == (3, 3, over, 0)
    assert max(len(e["input_ids"]) for e in examples) == limit
    assert stats.total_tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.trained_tokens == sum(
        sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in examples
    )
    assert stats.trimmed_tokens == sum(f.num_tokens for f in full) - sum(needed)
    assert 0 < stats.trained_fraction < 1

    examples, stats = build_examples(trajectories, tokenizer, max_seq_len=limit, truncation="drop")
    assert (stats.kept, stats.dropped, stats.truncated) == (2, 1, 0)
    assert len(examples) == 2

    # a trajectory whose only step is an erroneous one has nothing to train
    only_error = golden_lifespan().model_copy(deep=True)
    for turn in only_error.turns:
        if turn.role == "assistant":
            turn.kind, turn.loss = "erroneous_step", False
    examples, stats = build_examples([only_error], tokenizer, max_seq_len=4096)
    assert (examples, stats.empty, stats.kept) == ([], 1, 0)
    examples, stats = build_examples(
        [only_error], tokenizer, max_seq_len=4096, mask_erroneous=False
    )
    assert stats.kept == 1 and stats.trained_tokens > 0


def test_trailing_context_is_trimmed(tokenizer) -> None:
    trajectory = golden_find_non_living()  # ends with an observation
    full = tokenize_trajectory(trajectory, tokenizer)
    examples, stats = build_examples([trajectory], tokenizer, max_seq_len=4096)
    (example,) = examples
    assert example["labels"][-1] != IGNORE_INDEX
    assert tokenizer.decode(example["input_ids"][-1:]) == "<|im_end|>"
    assert example["input_ids"] == full.input_ids[: len(example["input_ids"])]
    assert stats.trimmed_tokens == full.num_tokens - len(example["input_ids"]) > 0


def test_show_mask_cli(tmp_path, params_file) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from stepflow.data.trajectory import write_trajectories

    path = tmp_path / "reflected.jsonl"
    write_trajectories(path, [golden_lifespan(), reflected_find_non_living()])
    runner = CliRunner()

    def show(*extra: str) -> tuple[int, str]:
        result = runner.invoke(app, [*args, *extra])
        return result.exit_code, " ".join(result.output.split())

    args = ["show-mask", str(path), "--params", str(params_file)]
    code, masked = show("--key", "scienceworld/find-non-living-thing/2")
    assert code == 0, masked
    assert "Reflection: Looking at the picture" in masked
    assert "trained (label = token): 89" in masked
    assert "assistant turn kept as context (label -100): 34" in masked
    assert "the first 332, of which 89 trained" in masked
    code, nomask = show("--index", "1", "--nomask")
    assert code == 0, nomask
    assert "trained (label = token): 123" in nomask
    assert "kept as context (label -100): 0" in nomask
    code, cut = show("-i", "1", "-S", "training.max_seq_len=100")
    assert code == 0 and "training input ends here (100 tokens)" in cut
    code, missing = show("--key", "scienceworld/none/0")
    assert code == 2 and "no trajectory with key" in missing
