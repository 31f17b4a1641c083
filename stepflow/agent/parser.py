"""Parse free-form model output into (thought, action).

Small models rarely follow the "Thought: ... / Action: ..." format exactly. The parser
tolerates what they commonly produce instead: chat-template leftovers, text around the step,
several actions (the first wins), markdown, quotes, list numbering, a missing "Action:" label
when the line is clearly an action, a leading "Reflection:" (teacher-style turns). Output it
cannot read is never an exception: the result carries `error`, and the rollout answers the
agent with `invalid_output_observation(error)`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

# Chat-template markers: everything from the first one on is not part of the turn.
END_MARKERS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "</s>",
    "[/INST]",
    "[INST]",
)
START_MARKERS = (
    "<s>",
    "<|im_start|>assistant",
    "<|assistant|>",
    "<|start_header_id|>assistant<|end_header_id|>",
    "<start_of_turn>model",
)

# First words of actions in the supported environments (ScienceWorld, ALFWorld, WebShop's
# `search[...]`/`click[...]`); a line
# with no "Action:" label is taken as the action only when it starts with one of these.
ACTION_VERBS = frozenset(
    {
        "activate",
        "clean",
        "click",
        "close",
        "connect",
        "cool",
        "deactivate",
        "disconnect",
        "dunk",
        "eat",
        "examine",
        "flush",
        "focus",
        "go",
        "heat",
        "inventory",
        "look",
        "mix",
        "move",
        "open",
        "pick",
        "pour",
        "put",
        "read",
        "search",
        "take",
        "task",
        "teleport",
        "toggle",
        "use",
        "wait",
        "wait1",
    }
)

_LABELS = ("reflection", "thought", "action", "observation")
# A label at the start of a line in any case, tolerating markdown ("**Action:**",
# "### Thought"), numbering ("Action 2:") and full-width colons; or a capitalised label
# inside a line ("... I should look. Action: look around").
_LABEL_RE = re.compile(
    r"(?:^[ \t>*#_\-]*(?P<label>(?i:reflection|thought|action|observation))"
    r"|(?<=\s)(?P<inline>Reflection|Thought|Action|Observation))"
    r"(?:[ \t]*\d+)?[ \t]*[*_]*[ \t]*[:：][*_]*[ \t]*",
    re.MULTILINE,
)
_NUMBERING_RE = re.compile(r"^(?:\(?\d{1,3}[.)]|[-*•])\s+")
_WRAPPERS = "`'\"*_“”‘’[<>"  # "]" only when unbalanced: `click[Buy Now]` keeps its own
_TRAILING_PUNCT = ".!?;,:"

INVALID_OUTPUT_HINT = "Reply with 'Thought: ...' then 'Action: ...'."


@dataclass(frozen=True)
class ParsedStep:
    """The result of parsing one model output; `error` is set when no action was found."""

    thought: str | None
    action: str | None
    error: str | None = None
    reflection: str | None = None

    @property
    def ok(self) -> bool:
        """Whether an action was found."""
        return self.error is None and self.action is not None


def invalid_output_observation(error: str) -> str:
    """The observation the agent sees after output that could not be parsed."""
    return f"Invalid output: {error}. {INVALID_OUTPUT_HINT}"


def strip_template_tokens(text: str) -> str:
    """Cut chat-template leftovers: leading start markers, everything from an end marker on."""
    text = text.lstrip()
    changed = True
    while changed:
        changed = False
        for marker in START_MARKERS:
            if text.startswith(marker):
                text = text[len(marker) :].lstrip()
                changed = True
    cut = len(text)
    for marker in END_MARKERS:
        index = text.find(marker)
        if index != -1:
            cut = min(cut, index)
    return text[:cut].strip()


def clean_action(raw: str) -> str:
    """Normalise an action string: first line, no markdown, quotes, numbering or final dot."""
    line = raw.strip().splitlines()[0] if raw.strip() else ""
    previous = None
    while line != previous:
        previous = line
        line = line.strip().strip(_WRAPPERS).strip()
        line = _NUMBERING_RE.sub("", line)
        line = line.rstrip(_TRAILING_PUNCT).strip()
        if line.endswith("]") and line.count("]") > line.count("["):
            line = line[:-1]
    return " ".join(line.split())


def _squash(text: str) -> str | None:
    text = " ".join(text.split())
    return text or None


def _sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split text at line-leading labels: (text before any label, [(label, body), ...])."""
    matches = list(_LABEL_RE.finditer(text))
    if not matches:
        return text, []
    preamble = text[: matches[0].start()]
    sections = []
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following is not None else len(text)
        label = match.group("label") or match.group("inline")
        sections.append((label.lower(), text[match.end() : end]))
    return preamble, sections


def _looks_like_action(line: str, verbs: Collection[str]) -> bool:
    words = clean_action(line).lower().split()
    return bool(words) and words[0].split("[", 1)[0] in verbs and len(words) <= 12


def parse_step(text: str | None, verbs: Collection[str] = ACTION_VERBS) -> ParsedStep:
    """Parse one model output into thought and action (never raises)."""
    text = strip_template_tokens(text or "")
    if not text:
        return ParsedStep(None, None, "empty output")
    preamble, sections = _sections(text)
    first: dict[str, str] = {}
    for label, body in sections:
        first.setdefault(label, body)
    reflection = _squash(first["reflection"]) if "reflection" in first else None
    thought = _squash(first["thought"]) if "thought" in first else None

    if "action" in first:
        body = first["action"].strip()
        action = clean_action(body)
        if not action:
            return ParsedStep(thought, None, "empty action after 'Action:'", reflection)
        if thought is None:
            thought = _squash(preamble)
        return ParsedStep(thought, action, None, reflection)

    # No "Action:" label: accept a bare line that starts with a known action verb, looking
    # first at unlabelled text, then at the lines after the thought's first line.
    for line in preamble.splitlines():
        if _looks_like_action(line, verbs):
            if thought is None:
                thought = _squash(preamble.replace(line, "", 1))
            return ParsedStep(thought, clean_action(line), None, reflection)
    if "thought" in first:
        head, *rest = first["thought"].strip().splitlines()
        for line in rest:
            if _looks_like_action(line, verbs):
                return ParsedStep(_squash(head), clean_action(line), None, reflection)
    return ParsedStep(thought, None, "no action found", reflection)
