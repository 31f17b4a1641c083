"""One episode of a ReAct agent in a text environment, recorded as a Trajectory.

The loop: reset → system + instruction turns → repeat { the policy writes a turn; it is
parsed; a parsed step is recorded as parsed (its reflection included, "Reflection: ... /
Thought: ... / Action: ...") and executed; an unparseable turn, or one cut at the generation
limit (`truncated`, never executed), is stored verbatim (never trained) and answered with an
invalid-output observation } until the environment is done or the student has written
`step_limit` turns.

With a reviewer (synthesis) every student step that did not solve the task is judged; a
wrong one is followed by the teacher's correction (see `stepflow.rollout.review`). Corrections come
on top of the student's step limit, up to `max_corrections`. An episode with a wrong step
that cannot be corrected — no budget left, no correction offered, a lost task that may not
be rewound — or whose correction was invalid or lowered the score stops there with a
`stop_reason`; synthesis never keeps it, so nothing in a kept trajectory went unjudged.

Over 300 lines, one module: the loop and the helpers that change an episode's state
(execute, correct, rewind) are read together; the review hook's types are in `review`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stepflow.agent.context import PromptFitter, fit_messages
from stepflow.agent.parser import ParsedStep, invalid_output_observation, parse_step
from stepflow.agent.prompts import (
    format_observation,
    format_reflection,
    format_step,
    format_turn,
    opening_turns,
)
from stepflow.data.trajectory import EpisodeStats, Provenance, StopReason, Trajectory, Turn
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import StepResult, TaskInstance
from stepflow.llm.base import BackendError, ChatBackend
from stepflow.method import EPISODE_PARAMS, SYNTHESIS_PARAMS
from stepflow.provenance import worker_identity
from stepflow.rollout.review import Reviewer, StepContext, StepReview

if TYPE_CHECKING:
    from stepflow.config import Params

log = logging.getLogger(__name__)

Source = Literal["rollout", "synthesis", "evaluation"]


@dataclass(frozen=True)
class EpisodeSettings:
    """How episodes run: the student's step limit (one for all, or per task type),
    observation clipping, generation length, corrections allowed per episode on top of the
    step limit, and provenance."""

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
    ) -> EpisodeSettings:
        """Settings of params.yaml (per-task step limits, agent, student, synthesis), with
        the step limits of the evaluation protocol (`evaluation.protocol`, e.g. ETO's caps)
        for evaluation episodes. The default `params_hash` reads the episode's keys
        (`stepflow.method.EPISODE_PARAMS`), a synthesis's those of synthesis; evaluation and
        synthesis always pass their own."""
        from stepflow.evaluate.protocols import evaluation_step_limit

        stage = SYNTHESIS_PARAMS if source == "synthesis" else EPISODE_PARAMS
        return cls(
            step_limit=(
                evaluation_step_limit(params)
                if source == "evaluation"
                else params.env.step_limit_for
            ),
            max_observation_chars=params.agent.max_observation_chars,
            max_new_tokens=params.student.generation.max_new_tokens,
            max_corrections=params.synthesis.max_corrections,
            source=source,
            params_hash=params_hash or params.section_hash(*stage.keys(params)),
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
        self.stop_reason: StopReason | None = None
        self.max_score: float | None = None  # the highest score after any executed action

    @property
    def steps(self) -> int:
        return sum(1 for turn in self.turns if turn.role == "assistant")

    @property
    def score(self) -> float:
        return self.last.score if self.last is not None else 0.0

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.done

    @property
    def running(self) -> bool:
        return not self.done and self.stop_reason is None


async def _execute(
    episode: _Episode, env: AsyncEnv, action: str, max_chars: int | None
) -> StepResult:
    started = time.perf_counter()
    result = await env.step(action)
    episode.stats.env_s += time.perf_counter() - started
    episode.actions.append(action)
    highest = episode.max_score
    episode.max_score = result.score if highest is None else max(highest, result.score)
    if not result.valid:
        episode.stats.invalid_actions += 1
    content = format_observation(result.observation, max_chars)
    episode.turns.append(Turn(role="user", kind="observation", content=content, score=result.score))
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


def _truncated(parsed: ParsedStep, max_new_tokens: int | None) -> ParsedStep:
    """A turn cut at the generation limit: unparseable, whatever it holds so far."""
    limit = f" ({max_new_tokens} tokens)" if max_new_tokens else ""
    return ParsedStep(
        parsed.thought,
        None,
        f"the turn was cut at the generation limit{limit} before it ended",
        parsed.reflection,
    )


def _mark_erroneous(episode: _Episode, index: int) -> None:
    student = episode.turns[index]
    episode.turns[index] = Turn(
        role="assistant", kind="erroneous_step", content=student.content, action=student.action
    )


async def _apply_review(
    episode: _Episode,
    env: AsyncEnv,
    review: StepReview,
    previous: StepResult | None,
    settings: EpisodeSettings,
) -> None:
    """Handle a step judged wrong: execute the correction in the state the wrong step left
    (rewinding only a step that lost the task), or stop the episode when it cannot be
    corrected; a correction that is invalid or lowers the score stops it too."""
    student_index = len(episode.turns) - 2
    lost = episode.last is not None and (episode.last.failed or episode.last.done)
    if review.action is None:
        episode.stop_reason = "no_correction"
    elif episode.stats.corrections >= settings.max_corrections:
        episode.stop_reason = "corrections_exhausted"
    elif lost and not review.rewind:
        episode.stop_reason = "unwinnable"
    if episode.stop_reason is not None:
        _mark_erroneous(episode, student_index)
        return
    assert review.action is not None
    if lost:
        # the step made the task unwinnable: take it back, in the world and in the context
        started = time.perf_counter()
        await env.restore(episode.instance, episode.actions[:-1])
        episode.stats.env_s += time.perf_counter() - started
        episode.actions.pop()
        del episode.turns[student_index:]
        episode.last = previous
        episode.stats.rewinds += 1
        turn = Turn(
            role="assistant",
            kind="step",
            loss=True,
            content=format_step(review.thought, review.action),
            action=review.action,
        )
    else:
        _mark_erroneous(episode, student_index)
        turn = Turn(
            role="assistant",
            kind="reflection",
            loss=True,
            content=format_reflection(review.reflection, review.thought, review.action),
            action=review.action,
        )
    before = episode.last.score if episode.last is not None else env.env.start_score
    episode.turns.append(turn)
    episode.stats.corrections += 1
    result = await _execute(episode, env, review.action, settings.max_observation_chars)
    if not result.valid or result.failed or result.score < before:
        episode.stop_reason = "bad_correction"


async def run_episode(
    env: AsyncEnv,
    instance: TaskInstance,
    backend: ChatBackend,
    settings: EpisodeSettings,
    *,
    example: str | None = None,
    reviewer: Reviewer | None = None,
) -> Trajectory:
    """Run the policy of `backend` on one task instance; return its trajectory."""
    started = time.perf_counter()
    restarts_before = env.env.restarts
    instruction, first_observation = await env.reset(instance)
    reset_s = time.perf_counter() - started
    turns = opening_turns(
        instance.env, instruction, first_observation, example, settings.max_observation_chars
    )
    turns[-1] = turns[-1].model_copy(update={"score": env.env.start_score})
    episode = _Episode(instance, instruction, turns)
    episode.stats.env_s = reset_s
    limit = settings.limit_for(instance)
    session = instance.key
    failure = None
    try:
        while episode.stats.student_steps < limit and episode.running:
            asked = time.perf_counter()
            messages = fit_messages(episode.turns, settings.prompt_fit, episode.stats)
            sent = time.perf_counter()
            completion = await backend.complete(
                messages, session=session, max_new_tokens=settings.max_new_tokens
            )
            episode.stats.prompt_s += sent - asked
            episode.stats.llm_s += time.perf_counter() - sent
            episode.stats.prompt_tokens += completion.prompt_tokens
            episode.stats.completion_tokens += completion.completion_tokens
            episode.stats.student_steps += 1
            parsed = parse_step(completion.text)
            if completion.finish_reason == "length":
                episode.stats.truncated += 1
                parsed = _truncated(parsed, settings.max_new_tokens)
            previous = episode.last
            if parsed.ok:
                assert parsed.action is not None
                episode.turns.append(
                    Turn(
                        role="assistant",
                        kind="step",
                        loss=True,
                        content=format_turn(parsed),
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
                        score=result.score,
                    )
                )
            if reviewer is None:
                continue
            if result.success:
                episode.stats.accepted_steps += 1
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
            reviewed = time.perf_counter()
            review = await reviewer.review(context)
            episode.stats.teacher_s += time.perf_counter() - reviewed
            if review is None:
                episode.stats.accepted_steps += 1
                continue
            episode.stats.erroneous_steps += 1
            await _apply_review(episode, env, review, previous, settings)
    except BackendError as exc:
        # an LLM (student or teacher) that stays unavailable after its retries: the episode
        # is recorded as failed with its cause, up to the last complete step
        failure = f"{type(exc).__name__}: {exc}"
        log.warning("%s: episode failed at step %d: %s", instance.key, episode.steps, failure)
    finally:
        backend.end_session(session)
    episode.stats.env_restarts = env.env.restarts - restarts_before
    stats = episode.stats
    stats.wall_s = round(time.perf_counter() - started, 3)
    for name in ("prompt_s", "llm_s", "env_s", "teacher_s"):
        setattr(stats, name, round(getattr(stats, name), 3))
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
        max_score=episode.max_score,
        success=last.success if last is not None else False,
        num_steps=episode.steps,
        done=episode.done,
        failure=failure,
        stop_reason=episode.stop_reason,
        stats=episode.stats,
        provenance=Provenance(
            source=settings.source,
            params_hash=settings.params_hash,
            student_model=backend.name,
            teacher=getattr(reviewer, "name", None) if reviewer is not None else None,
            extra=worker_identity(),
        ),
    )
