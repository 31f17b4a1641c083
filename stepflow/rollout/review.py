"""The hook through which a teacher reviews each student step during a rollout.

After every student step that did not solve the task the rollout asks the reviewer: every
student step of a synthesis episode is judged. An unparseable or truncated turn is reviewed
too: its `action` is "" and its result is the invalid-output observation with the world
unchanged. Each call counts in `stats.teacher_calls`.

A returned `StepReview` judges the step wrong. With an `action`, the student's turn becomes
an erroneous step (kept as context, never trained) and the "Reflection / Thought / Action"
correction is executed in the state the wrong step left. Only a wrong step that made the
task unwinnable (`rewind=True`) is taken back: the world is restored and the step and its
observation leave the conversation, so the context always shows the world the agent is in;
the correction then follows as a plain step. A review without `action` (the teacher has no
correction to offer) stops the episode, which is then never kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from stepflow.data.trajectory import EpisodeStats, Turn
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import StepResult, TaskInstance

if TYPE_CHECKING:
    from stepflow.teacher.base import TeacherStats


@dataclass
class StepContext:
    """What a reviewer sees of the step under review.

    `turns` ends with the student's assistant turn and its observation; `step_index` is
    the 0-based index of that turn among the assistant turns; `actions` are the actions
    the environment has executed so far (the reviewed one last); observation turns carry
    the score after their action. `stats` is the episode's live counters (a reviewer may count e.g.
    `teacher_fallbacks` there). `env` may be queried (`await ctx.env.valid_actions()`) but
    must not be stepped.
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
    """The verdict "wrong" on the reviewed step, with its correction when there is one.

    `rewind=True` (only for a step that lost the task or ended the episode) restores the
    world to before the step and takes the step out of the conversation.
    """

    reflection: str
    thought: str
    action: str | None
    rewind: bool = False
    reason: str | None = None


@runtime_checkable
class Reviewer(Protocol):
    """Judges student steps; returns a StepReview for a wrong step, None for a good one."""

    async def review(self, ctx: StepContext) -> StepReview | None:
        """Review the latest student step."""
        ...


class JobReviewer(Reviewer, Protocol):
    """The reviewer of a rollout job: named (episodes record it as their teacher), counting
    its teacher's verdicts and tokens, closed when the job ends."""

    name: str

    @property
    def stats(self) -> TeacherStats:
        """The teacher's counters so far."""
        ...

    async def aclose(self) -> None:
        """Release the teacher's backend."""
        ...


class ReviewSetup(Protocol):
    """How a rollout job gets its reviewer: a picklable recipe, started in the process that
    runs the job's episodes (a shard's worker builds its own teacher)."""

    def start(self) -> JobReviewer:
        """Build the reviewer."""
        ...
