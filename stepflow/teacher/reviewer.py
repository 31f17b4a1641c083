"""A teacher plugged into the rollout as its step reviewer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from stepflow.data.trajectory import Trajectory
from stepflow.rollout.review import StepContext, StepReview
from stepflow.teacher.base import StepFacts, Teacher, TeacherStats

RewindPolicy = Literal["auto", "never"]


def facts_from_context(ctx: StepContext) -> StepFacts:
    """The teacher's view of the step under review."""
    return StepFacts(
        instance=ctx.instance,
        instruction=ctx.instruction,
        history=list(ctx.turns[:-2]),
        thought=ctx.thought,
        action=ctx.action,
        observation=ctx.turns[-1].content,
        valid=ctx.result.valid,
        score=ctx.result.score,
        previous_score=ctx.previous_score,
        failed=ctx.result.failed,
        done=ctx.result.done,
        step_index=ctx.step_index,
    )


def should_rewind(policy: RewindPolicy, facts: StepFacts) -> bool:
    """Whether to take the wrong step back before correcting it: only when it made the task
    unwinnable (policy `auto`); otherwise the correction runs in the state the step left."""
    return policy == "auto" and (facts.failed or facts.done)


class TeacherReviewer:
    """Asks the teacher about every student step, with the instance's golden reference."""

    def __init__(
        self,
        teacher: Teacher,
        references: Mapping[str, Trajectory],
        rewind: RewindPolicy = "auto",
    ) -> None:
        self.teacher = teacher
        self.references = references
        self.rewind = rewind
        self.name = teacher.name

    @property
    def stats(self) -> TeacherStats:
        """The teacher's counters."""
        return self.teacher.stats

    async def aclose(self) -> None:
        """Close the teacher's backend."""
        await self.teacher.aclose()

    async def review(self, ctx: StepContext) -> StepReview | None:
        """A correction when the teacher judges the step wrong."""
        reference = self.references.get(ctx.instance.key)
        if reference is None:
            raise KeyError(f"{ctx.instance.key}: no golden reference trajectory for the teacher")
        facts = facts_from_context(ctx)
        judgment = await self.teacher.judge(facts, reference)
        if judgment.fallback:
            ctx.stats.teacher_fallbacks += 1
        if judgment.correct:
            return None
        return StepReview(
            reflection=judgment.reflection or "",
            thought=judgment.thought or "",
            action=judgment.action or None,
            rewind=should_rewind(self.rewind, facts),
            reason=judgment.reason,
        )
