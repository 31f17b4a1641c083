"""A human view of partial masking: a tokenized trajectory with its trained tokens highlighted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from stepflow.train.masking import TokenizedTrajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
