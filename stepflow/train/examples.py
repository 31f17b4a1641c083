"""Training examples: tokenized trajectories (`stepflow.train.masking`) fitted to
`training.max_seq_len`, with counts of what was fitted, cut or dropped (`MaskStats`).

Training examples drop trailing context tokens (tokens after the last trained token change
no loss under causal attention), then apply the truncation policy to what remains. With
`elide` (the default), the prompt of a trajectory's last trained turn is fitted by the
agent's context rule (`stepflow.agent.context`: oldest observations elided, then the
demonstration dropped, then the oldest steps windowed) to the agent's prompt budget, exactly
as the agent's prompt was fitted at that step, or tighter when the row would not fit
`max_seq_len`; the row is cut only if it still does not fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from stepflow.agent.context import Fitted, TemplateCounter, fit_turns
from stepflow.agent.prompts import to_messages
from stepflow.data.trajectory import Trajectory, Turn
from stepflow.train.masking import (
    IGNORE_INDEX,
    TokenizedTrajectory,
    Truncation,
    end_of_turn_ids,
    is_trained,
    tokenize_turns,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class MaskStats:
    """What tokenization did to a set of trajectories.

    `examples` were read; `kept` became training examples; `dropped` were over-long under
    the `drop` policy; `truncated` were cut to `max_seq_len`; `empty` had no trained token;
    `fitted` were fitted to `max_seq_len` by the context rule (`elide`), which elided
    `elided_observations` observations, dropped `examples_dropped` demonstrations and
    windowed out `windowed_steps` steps (`windowed_trained_turns` of them trained turns,
    not trained then). Token counts cover the kept examples; `max_trained_turn_tokens` is
    the longest trained assistant turn (what the model must be able to generate in one
    turn); turn counts (by kind) cover every input.
    """

    examples: int = 0
    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    empty: int = 0
    trimmed_tokens: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    max_tokens: int = 0
    max_trained_turn_tokens: int = 0
    fitted: int = 0
    elided_observations: int = 0
    examples_dropped: int = 0
    windowed_steps: int = 0
    windowed_trained_turns: int = 0
    per_kind_trained_turns: dict[str, int] = field(default_factory=dict)
    per_kind_masked_turns: dict[str, int] = field(default_factory=dict)
    per_kind_trained_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def trained_fraction(self) -> float:
        """Trained tokens / tokens fed to the model."""
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def as_dict(self) -> dict:
        """A JSON-ready dict, `trained_fraction` included."""
        return {**asdict(self), "trained_fraction": round(self.trained_fraction, 6)}


def training_length(
    tokenized: TokenizedTrajectory, max_seq_len: int, truncation: Truncation = "truncate"
) -> int | None:
    """How many leading tokens of a trajectory training uses: up to its last trained token,
    cut to `max_seq_len` (`truncate`, and `elide` after fitting); None when it is left out
    (`drop`, or nothing trained)."""
    trained = tokenized.trained_positions()
    if not trained:
        return None
    keep = max(trained) + 1
    if keep <= max_seq_len:
        return keep
    return max_seq_len if truncation == "truncate" else None


def fit_for_training(
    turns: Sequence[Turn],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    *,
    prompt_budget: int | None = None,
    mask_erroneous: bool = True,
    counter: TemplateCounter | None = None,
) -> Fitted | None:
    """The conversation with the prompt of its last trained turn fitted exactly as the
    agent's prompt was at that step (`fit_turns` with the agent's `prompt_budget`), or
    tighter when the row would not fit `max_seq_len` otherwise; the turns after it are kept
    (trailing context is trimmed later). None when no fitting is needed; `overflow` set
    when even the fully reduced prompt is too long (training then cuts the row)."""
    trained = [i for i, turn in enumerate(turns) if is_trained(turn, mask_erroneous)]
    if not trained:
        return None
    last = trained[-1]
    counter = counter or TemplateCounter(tokenizer)
    prompt = counter.count(to_messages(list(turns[:last])), generation_prompt=True)
    row = counter.count(to_messages(list(turns[: last + 1])), generation_prompt=False)
    budget = max_seq_len - (row - prompt)
    if prompt_budget is not None:
        budget = min(budget, prompt_budget)
    if prompt <= budget:
        return None
    fitted = fit_turns(turns[:last], max(budget, 1), counter, strict=False)
    return replace(fitted, turns=[*fitted.turns, *turns[last:]])


@dataclass
class TrainingView:
    """What training makes of one trajectory: the tokenized conversation it trains on (fitted
    to `max_seq_len` under `elide`), how many leading tokens it uses (None: left out), the
    fitting done (None when none was needed) and the unfitted tokenization."""

    tokenized: TokenizedTrajectory
    keep: int | None
    fitted: Fitted | None
    original: TokenizedTrajectory


def training_view(
    trajectory: Trajectory,
    tokenizer: PreTrainedTokenizerBase,
    *,
    mask_erroneous: bool = True,
    max_seq_len: int,
    truncation: Truncation = "elide",
    prompt_budget: int | None = None,
    end_token_ids: Iterable[int] | None = None,
    counter: TemplateCounter | None = None,
) -> TrainingView:
    """One trajectory as training sees it (see `build_examples`)."""
    end_ids = set(end_token_ids) if end_token_ids is not None else end_of_turn_ids(tokenizer)
    original = tokenize_turns(
        trajectory.turns, tokenizer, mask_erroneous=mask_erroneous, end_token_ids=end_ids
    )
    tokenized, fitted = original, None
    if truncation == "elide":
        fitted = fit_for_training(
            trajectory.turns,
            tokenizer,
            max_seq_len,
            prompt_budget=prompt_budget,
            mask_erroneous=mask_erroneous,
            counter=counter,
        )
    if fitted is not None:
        tokenized = tokenize_turns(
            fitted.turns, tokenizer, mask_erroneous=mask_erroneous, end_token_ids=end_ids
        )
    policy: Truncation = "truncate" if truncation == "elide" else truncation
    keep = training_length(tokenized, max_seq_len, policy)
    return TrainingView(tokenized, keep, fitted, original)


def build_examples(
    trajectories: Iterable[Trajectory],
    tokenizer: PreTrainedTokenizerBase,
    *,
    mask_erroneous: bool = True,
    max_seq_len: int,
    truncation: Truncation = "elide",
    prompt_budget: int | None = None,
    end_token_ids: Iterable[int] | None = None,
) -> tuple[list[dict[str, list[int]]], MaskStats]:
    """Training examples (`input_ids`, `labels`) and counts of what was cut or dropped.

    Trailing context tokens are trimmed first. Under `elide`, the prompt of the last
    trained turn is fitted as the agent's prompt was at that step (`prompt_budget`: the
    agent's context minus its generation length; tighter when the row would exceed
    `max_seq_len`) and the row is cut if still too long; under `truncate` an example longer
    than `max_seq_len` is cut to its first `max_seq_len` tokens, under `drop` left out. An
    example with no trained token left is left out and counted as `empty`.
    """
    if truncation not in ("elide", "truncate", "drop"):
        raise ValueError(f"truncation must be 'elide', 'truncate' or 'drop', got {truncation!r}")
    end_ids = set(end_token_ids) if end_token_ids is not None else end_of_turn_ids(tokenizer)
    fit_counter = TemplateCounter(tokenizer) if truncation == "elide" else None
    stats = MaskStats()
    examples: list[dict[str, list[int]]] = []
    for trajectory in trajectories:
        stats.examples += 1
        view = training_view(
            trajectory,
            tokenizer,
            mask_erroneous=mask_erroneous,
            max_seq_len=max_seq_len,
            truncation=truncation,
            prompt_budget=prompt_budget,
            end_token_ids=end_ids,
            counter=fit_counter,
        )
        for span in view.original.spans:
            counter = stats.per_kind_trained_turns if span.trained else stats.per_kind_masked_turns
            counter[span.kind] = counter.get(span.kind, 0) + 1
        if view.fitted is not None:
            stats.fitted += 1
            stats.elided_observations += view.fitted.elided_observations
            stats.examples_dropped += int(view.fitted.example_dropped)
            stats.windowed_steps += view.fitted.dropped_steps
            stats.windowed_trained_turns += view.fitted.dropped_trained
        tokenized, keep = view.tokenized, view.keep
        trained = tokenized.trained_positions()
        if not trained:
            stats.empty += 1
            continue
        stats.trimmed_tokens += tokenized.num_tokens - (max(trained) + 1)
        if keep is None:
            stats.dropped += 1
            continue
        if keep < max(trained) + 1:
            stats.truncated += 1
        input_ids = tokenized.input_ids[:keep]
        labels = tokenized.labels[:keep]
        n_trained = sum(1 for label in labels if label != IGNORE_INDEX)
        if n_trained == 0:
            stats.empty += 1
            continue
        for span in tokenized.spans:
            if span.trained and span.start < keep:
                count = min(span.train_end, keep) - span.start
                tokens = stats.per_kind_trained_tokens
                tokens[span.kind] = tokens.get(span.kind, 0) + count
        examples.append({"input_ids": input_ids, "labels": labels})
        stats.kept += 1
        stats.total_tokens += keep
        stats.trained_tokens += n_trained
        stats.max_tokens = max(stats.max_tokens, keep)
        for span in tokenized.spans:
            if span.trained and span.train_end <= keep:
                stats.max_trained_turn_tokens = max(
                    stats.max_trained_turn_tokens, span.train_end - span.start
                )
    return examples, stats
