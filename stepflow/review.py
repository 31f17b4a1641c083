"""The hook through which a teacher reviews each student step during a rollout.

After every student step (not once the task is solved) the rollout asks the reviewer, while
the episode has corrections left and the step limit leaves room for one more turn. An
unparseable turn is reviewed too: its `action` is "" and its result is the invalid-output
observation with the world unchanged. Each call counts in `stats.teacher_calls`. A returned
`StepReview` marks the student's turn as an erroneous step (kept as context, never
trained) and its corrected "Reflection / Thought / Action" turn is executed in its place;
the correction counts against the step limit and in `stats.corrections`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import StepResult, TaskInstance
from stepflow.trajectory import EpisodeStats, Turn


@dataclass
class StepContext:
    """What a reviewer sees of the step under review.

    `turns` ends with the student's assistant turn and its observation; `step_index` is
    the 0-based index of that turn among the assistant turns; `actions` are the actions
    the environment has executed so far (the reviewed one last). `stats` is the episode's
    live counters (a reviewer may count e.g. `teacher_fallbacks` there). `env` may be
    queried (`await ctx.env.valid_actions()`) but must not be stepped.
    """

    instance: TaskInstance
    instruction: str
    turns: list[Turn]
    thought: str | None
    action: str
    result: StepResult
    previous_score: float
    step_index: int
    actions: list[str]
    corrections: int
    stats: EpisodeStats
    env: AsyncEnv


@dataclass(frozen=True)
class StepReview:
    """A correction of the reviewed step.

    `rewind=True` restores the environment to its state before the erroneous step before
    the correction runs (e.g. after a wrong "focus on", which ends the task). A step that
    ended the episode is always rewound: a finished episode cannot go on.
    """

    reflection: str
    thought: str
    action: str
    rewind: bool = False


@runtime_checkable
class Reviewer(Protocol):
    """Judges student steps; returns a correction, or None when the step is fine."""

    async def review(self, ctx: StepContext) -> StepReview | None:
        """Review the latest student step."""
        ...
