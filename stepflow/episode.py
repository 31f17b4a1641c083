"""One episode of a ReAct agent in a text environment, recorded as a Trajectory.

The loop: reset → system + instruction turns → repeat { the policy writes a turn; it is
parsed; a parsed step is stored normalised ("Thought: ... / Action: ...") and executed,
an unparseable one is stored verbatim (never trained) and answered with an invalid-output
observation } until the environment is done or the step limit (assistant turns, including
corrections) is reached. An optional reviewer may correct any student step (see
`stepflow.review`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stepflow.agent.context import PromptFitter, fit_messages
from stepflow.agent.parser import invalid_output_observation, parse_step
from stepflow.agent.prompts import (
    format_observation,
    format_reflection,
    format_step,
    opening_turns,
)
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import StepResult, TaskInstance
from stepflow.llm.base import BackendError, ChatBackend
from stepflow.review import Reviewer, StepContext, StepReview
from stepflow.trajectory import EpisodeStats, Provenance, Trajectory, Turn

if TYPE_CHECKING:
    from stepflow.config import Params

log = logging.getLogger(__name__)

Source = Literal["rollout", "synthesis", "evaluation"]


@dataclass(frozen=True)
class RolloutSettings:
    """How episodes run: step limits (one for all, or per task type), observation clipping,
    generation length, corrections allowed per episode, and provenance."""

    step_limit: int | Callable[[str], int] = 30
    max_observation_chars: int | None = None
    max_new_tokens: int | None = None
    max_corrections: int = 0
    source: Source = "rollout"
    params_hash: str | None = None
    prompt_fit: PromptFitter | None = None

    def limit_for(self, instance: TaskInstance) -> int:
        """The step limit of an instance."""
        if callable(self.step_limit):
            return self.step_limit(instance.task_type)
        return self.step_limit

    @classmethod
    def from_params(
        cls, params: Params, *, source: Source = "rollout", params_hash: str | None = None
    ) -> RolloutSettings:
        """Settings of params.yaml (per-task step limits, agent, student, synthesis)."""
        sections = ["env", "agent", "student"]
        if source == "synthesis":
            sections += ["teacher", "synthesis"]
        return cls(
            step_limit=params.env.step_limit_for,
            max_observation_chars=params.agent.max_observation_chars,
            max_new_tokens=params.student.generation.max_new_tokens,
            max_corrections=params.synthesis.max_corrections,
            source=source,
            params_hash=params_hash or params.section_hash(*sections),
        )


class _Episode:
    """The mutable state of one running episode."""

    def __init__(self, instance: TaskInstance, instruction: str, turns: list[Turn]) -> None:
        self.instance = instance
        self.instruction = instruction
        self.turns = turns
        self.stats = EpisodeStats()
        self.actions: list[str] = []
        self.last: StepResult | None = None

    @property
    def steps(self) -> int:
        return sum(1 for turn in self.turns if turn.role == "assistant")

    @property
    def score(self) -> float:
        return self.last.score if self.last is not None else 0.0

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.done


async def _execute(
    episode: _Episode, env: AsyncEnv, action: str, max_chars: int | None
) -> StepResult:
    result = await env.step(action)
    episode.actions.append(action)
    if not result.valid:
        episode.stats.invalid_actions += 1
    content = format_observation(result.observation, max_chars)
    episode.turns.append(Turn(role="user", kind="observation", content=content))
    episode.last = result
    return result


def _unparsed(message: str, previous: StepResult | None, env: AsyncEnv) -> StepResult:
    """The outcome of a turn with no action: nothing ran, the world is as it was."""
    score = previous.score if previous is not None else env.env.start_score
    return StepResult(
        observation=message,
        reward=previous.reward if previous is not None else max(0.0, min(score, 100)) / 100,
        score=score,
        done=False,
        success=False,
        valid=False,
    )


async def _apply_review(
    episode: _Episode,
    env: AsyncEnv,
    review: StepReview,
    previous: StepResult | None,
    settings: RolloutSettings,
) -> None:
    """Turn the reviewed student step into an erroneous step and execute the correction."""
    student = episode.turns[-2]
    episode.turns[-2] = Turn(
        role="assistant", kind="erroneous_step", content=student.content, action=student.action
    )
    if student.action is not None and (review.rewind or episode.done):
        await env.restore(episode.instance, episode.actions[:-1])
        episode.actions.pop()
        episode.last = previous
    episode.turns.append(
        Turn(
            role="assistant",
            kind="reflection",
            loss=True,
            content=format_reflection(review.reflection, review.thought, review.action),
            action=review.action,
        )
    )
    episode.stats.corrections += 1
    await _execute(episode, env, review.action, settings.max_observation_chars)


async def run_episode(
    env: AsyncEnv,
    instance: TaskInstance,
    backend: ChatBackend,
    settings: RolloutSettings,
    *,
    example: str | None = None,
    reviewer: Reviewer | None = None,
) -> Trajectory:
    """Run the policy of `backend` on one task instance; return its trajectory."""
    started = time.perf_counter()
    restarts_before = env.env.restarts
    instruction, first_observation = await env.reset(instance)
    turns = opening_turns(
        instance.env, instruction, first_observation, example, settings.max_observation_chars
    )
    episode = _Episode(instance, instruction, turns)
    limit = settings.limit_for(instance)
    session = instance.key
    failure = None
    try:
        while episode.steps < limit and not episode.done:
            completion = await backend.complete(
                fit_messages(episode.turns, settings.prompt_fit, episode.stats),
                session=session,
                max_new_tokens=settings.max_new_tokens,
            )
            episode.stats.prompt_tokens += completion.prompt_tokens
            episode.stats.completion_tokens += completion.completion_tokens
            parsed = parse_step(completion.text)
            previous = episode.last
            if parsed.ok:
                assert parsed.action is not None
                episode.turns.append(
                    Turn(
                        role="assistant",
                        kind="step",
                        loss=True,
                        content=format_step(parsed.thought, parsed.action),
                        action=parsed.action,
                    )
                )
                result = await _execute(episode, env, parsed.action, settings.max_observation_chars)
            else:
                episode.stats.parse_failures += 1
                episode.turns.append(
                    Turn(role="assistant", kind="step", content=completion.text.strip())
                )
                result = _unparsed(invalid_output_observation(parsed.error), previous, env)
                episode.turns.append(
                    Turn(
                        role="user",
                        kind="observation",
                        content=format_observation(result.observation),
                    )
                )
            if (
                reviewer is None
                or result.success
                or episode.stats.corrections >= settings.max_corrections
                or episode.steps >= limit
            ):
                continue
            context = StepContext(
                instance=instance,
                instruction=instruction,
                turns=list(episode.turns),
                thought=parsed.thought,
                action=parsed.action or "",
                result=result,
                previous_score=previous.score if previous is not None else env.env.start_score,
                step_index=episode.steps - 1,
                actions=list(episode.actions),
                corrections=episode.stats.corrections,
                stats=episode.stats,
                env=env,
            )
            episode.stats.teacher_calls += 1
            review = await reviewer.review(context)
            if review is not None:
                await _apply_review(episode, env, review, previous, settings)
    except BackendError as exc:
        # an LLM (student or teacher) that stays unavailable after its retries: the episode
        # is recorded as failed with its cause, up to the last complete step
        failure = f"{type(exc).__name__}: {exc}"
        log.warning("%s: episode failed at step %d: %s", instance.key, episode.steps, failure)
    finally:
        backend.end_session(session)
    episode.stats.env_restarts = env.env.restarts - restarts_before
    episode.stats.wall_s = round(time.perf_counter() - started, 3)
    last = episode.last
    return Trajectory(
        env=instance.env,
        task_type=instance.task_type,
        variation=instance.variation,
        split=instance.split,
        instruction=instruction,
        turns=episode.turns,
        reward=last.reward if last is not None else 0.0,
        score=episode.score,
        success=last.success if last is not None else False,
        num_steps=episode.steps,
        done=episode.done,
        failure=failure,
        stats=episode.stats,
        provenance=Provenance(
            source=settings.source,
            params_hash=settings.params_hash,
            student_model=backend.name,
            teacher=getattr(reviewer, "name", None) if reviewer is not None else None,
        ),
    )
