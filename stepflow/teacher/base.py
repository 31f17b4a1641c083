"""What a teacher sees of a student step and what it answers; reflection text cleaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

from stepflow.agent.parser import strip_template_tokens
from stepflow.data.trajectory import Trajectory, Turn
from stepflow.envs.base import TaskInstance

# A leading "Reflection:" label, tolerating markdown ("**Reflection:**", a "### Reflection"
# heading line).
_REFLECTION_LABEL = re.compile(r"^[\s>*#_`\-]*reflection[ \t*_]*(?:[:：]|\n)[\s*_]*", re.IGNORECASE)
# Where the reflection ends: a Thought/Action/Observation label at the start of a line (any
# case, markdown allowed) or capitalised inside a line ("... again. Action: look around").
_NEXT_LABEL = re.compile(
    r"(?:^[ \t>*#_\-]*(?i:thought|action|observation)|(?<=\s)(?:Thought|Action|Observation))"
    r"(?:[ \t]*\d+)?[ \t]*[*_]*[ \t]*[:：]",
    re.MULTILINE,
)
_FENCE_LINE = re.compile(r"^\s*```.*$", re.MULTILINE)
_LINE_MARKUP = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+|>[ \t]*|[-*•][ \t]+|\d{1,3}[.)][ \t]+)", re.MULTILINE
)
_QUOTES = "\"'“”‘’`"


def clean_reflection(text: str | None) -> str:
    """The reflection an LLM wrote, as one plain paragraph ready for `Reflection: ...`.

    Drops chat-template leftovers, code fences, leading "Reflection:" labels (repeated ones
    too), everything from a Thought/Action/Observation label on, every paragraph after the
    first, markdown (headings, bullets, quotes, emphasis) and surrounding quotes. Returns ""
    when nothing is left: the caller counts the answer as malformed and falls back.
    """
    text = _FENCE_LINE.sub("", strip_template_tokens(text or "")).strip()
    previous = None
    while text != previous:
        previous = text
        text = _REFLECTION_LABEL.sub("", text, count=1).strip()
    label = _NEXT_LABEL.search(text)
    if label is not None:
        text = text[: label.start()]
    text = re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0]
    text = _LINE_MARKUP.sub("", text)
    text = re.sub(r"(\*\*|__|\*|`)", "", text)
    text = " ".join(text.split()).strip(_QUOTES).strip()
    return text


def strip_label(text: str | None, label: str) -> str:
    """`text` without a leading "<label>:" (any case, markdown allowed), stripped."""
    pattern = re.compile(rf"^[\s>*#_`\-]*{label}[\s*_]*[:：][\s*_]*", re.IGNORECASE)
    return pattern.sub("", (text or "").strip(), count=1).strip()


Reason = Literal["unparseable", "invalid", "failed", "worse", "no_progress", "llm"]


@dataclass
class StepFacts:
    """The student's latest executed step and the episode so far.

    `history` holds the turns before the latest student turn (system prompt first).
    """

    instance: TaskInstance
    instruction: str
    history: list[Turn]
    thought: str | None
    action: str
    observation: str
    valid: bool
    score: float
    previous_score: float
    failed: bool
    done: bool
    step_index: int


@dataclass
class Judgment:
    """A verdict on one step; a wrong step comes with a reflection and a corrected step."""

    correct: bool
    reflection: str | None = None
    thought: str | None = None
    action: str | None = None
    reason: Reason | None = None
    fallback: bool = False

    @classmethod
    def ok(cls) -> Judgment:
        """The step is fine."""
        return cls(correct=True)


@dataclass
class TeacherStats:
    """Counters over a whole synthesis run."""

    calls: int = 0
    corrections: int = 0
    malformed: int = 0
    retries: int = 0
    fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fitted_prompts: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def count(self, judgment: Judgment) -> None:
        """Record one verdict."""
        self.calls += 1
        if judgment.fallback:
            self.fallbacks += 1
        if not judgment.correct:
            self.corrections += 1
            key = judgment.reason or "llm"
            self.reasons[key] = self.reasons.get(key, 0) + 1


class Teacher(Protocol):
    """Judges a student step given the golden reference trajectory of the task."""

    name: str
    stats: TeacherStats

    async def judge(self, facts: StepFacts, reference: Trajectory) -> Judgment: ...

    async def aclose(self) -> None: ...
