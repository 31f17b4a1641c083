"""What a teacher sees of a student step and what it answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from stepflow.envs.base import TaskInstance
from stepflow.trajectory import Trajectory, Turn

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
