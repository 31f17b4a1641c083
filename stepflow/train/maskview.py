"""A human view of partial masking: a tokenized trajectory with its trained tokens highlighted,
where training cuts it, and how much of it is trained."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from stepflow.train.examples import TrainingView
from stepflow.train.masking import IGNORE_INDEX, TokenizedTrajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stepflow.data.trajectory import Trajectory

TRAINED = "bold black on green"
MASKED_STEP = "red strike"
CONTEXT = "dim"
CUT = "bold white on red"

LEGEND = {
    "trained": ("trained (label = token)", TRAINED),
    "masked": ("assistant turn kept as context (label -100)", MASKED_STEP),
    "context": ("prompt, observation, template text (label -100)", CONTEXT),
}


def token_classes(tokenized: TokenizedTrajectory) -> list[str]:
    """One of 'trained', 'masked', 'context' per token."""
    classes = ["trained" if label != -100 else "context" for label in tokenized.labels]
    for span in tokenized.spans:
        if not span.trained:
            classes[span.start : span.train_end] = ["masked"] * (span.train_end - span.start)
    return classes


def render_mask(
    tokenized: TokenizedTrajectory,
    tokenizer: PreTrainedTokenizerBase,
    cut_at: int | None = None,
) -> Text:
    """The conversation as text, styled by token class; `cut_at` marks where training stops."""
    classes = token_classes(tokenized)
    text = Text()
    run_start = 0
    for pos in range(1, len(classes) + 1):
        boundary = pos == cut_at
        if pos < len(classes) and classes[pos] == classes[run_start] and not boundary:
            continue
        chunk = tokenizer.decode(tokenized.input_ids[run_start:pos], skip_special_tokens=False)
        text.append(chunk, style=LEGEND[classes[run_start]][1])
        if boundary:
            text.append(f" ✂ training input ends here ({cut_at} tokens) ", style=CUT)
        run_start = pos
    return text


def mask_counts(tokenized: TokenizedTrajectory) -> dict[str, int]:
    """Tokens per class."""
    counts = dict.fromkeys(LEGEND, 0)
    for cls in token_classes(tokenized):
        counts[cls] += 1
    return counts


def legend(counts: dict[str, int]) -> Text:
    """A one-line legend with the token count of each class."""
    text = Text()
    for name, (meaning, style) in LEGEND.items():
        text.append(f" {name} ", style=style)
        text.append(f" {meaning}: {counts.get(name, 0)}   ")
    return text


def pick_trajectory(
    records: list[Trajectory], source: str, *, index: int | None = None, key: str | None = None
) -> Trajectory:
    """The trajectory of `records` (read from `source`) with this instance `key`, or at
    `index` (negative from the end; default the first); LookupError names the problem."""
    if index is not None and key is not None:
        raise LookupError("give --index or --key, not both")
    if key is not None:
        chosen = next((t for t in records if t.key == key), None)
        if chosen is None:
            raise LookupError(f"{source}: no trajectory with key {key!r}")
        return chosen
    position = index or 0
    if not -len(records) <= position < len(records):
        raise LookupError(f"{source}: index {position} out of range ({len(records)} trajectories)")
    return records[position]


def cut_at(view: TrainingView) -> int | None:
    """Where the training input ends inside the conversation (None: it takes it whole, or
    the trajectory is left out)."""
    return view.keep if view.keep != view.tokenized.num_tokens else None


def view_notes(view: TrainingView, limits: str) -> list[str]:
    """What the view does not show: the fitting to `max_seq_len`, and how many of the
    conversation's tokens go into training and are trained (`limits` names the settings)."""
    notes = []
    tokenized, keep = view.tokenized, view.keep
    if view.fitted is not None:
        notes.append(
            f"fitted to max_seq_len ({view.original.num_tokens} tokens unfitted): "
            f"{view.fitted.elided_observations} earlier observations elided, "
            f"demonstration {'dropped' if view.fitted.example_dropped else 'kept'}, "
            f"{view.fitted.dropped_steps} steps windowed out"
        )
    if keep is None:
        notes.append(f"{tokenized.num_tokens} tokens; left out of training ({limits})")
        return notes
    fed = sum(1 for label in tokenized.labels[:keep] if label != IGNORE_INDEX)
    notes.append(
        f"{tokenized.num_tokens} tokens; training input: the first {keep}, of which "
        f"{fed} trained ({fed / keep:.1%}) ({limits})"
    )
    return notes
