"""The rollout engine: many episodes at once, each finished one appended to a JSONL file.

`concurrency` workers each own one environment (its own simulator process) and run one
episode at a time; their LLM calls overlap, so a batching backend decodes them together.
A finished episode is appended (and fsynced) at once; a rerun on the same file skips the
instances already there, so an interrupted rollout resumes where it stopped.

Faults: a simulator that dies for good (beyond its own restarts) gets the episode started
over on a fresh environment (`episode_attempts`); an LLM endpoint that stays down after its
retries ends the episode, which is recorded as failed with the cause (`Trajectory.failure`)
while the run goes on. A rerun retries the failed episodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stepflow.data.trajectory import Trajectory, TrajectoryLog
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import EnvCrashed, TaskInstance, TextEnv
from stepflow.llm.base import ChatBackend
from stepflow.progress import progress_bar
from stepflow.rollout.episode import EpisodeSettings, run_episode
from stepflow.rollout.review import Reviewer

if TYPE_CHECKING:
    from stepflow.teacher.base import TeacherStats

log = logging.getLogger(__name__)

ExampleFor = Callable[[TaskInstance], str | None]


class EpisodeErrors(RuntimeError):
    """Some episodes could not be run; the finished ones are kept for a rerun."""


@dataclass
class RolloutSummary:
    """Totals over the requested instances that have a trajectory in the output file."""

    episodes: int = 0
    new_episodes: int = 0
    skipped: int = 0
    remaining: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    env_restarts: int = 0
    mean_reward: float = 0.0
    success_rate: float = 0.0
    steps: int = 0
    parse_failures: int = 0
    truncated: int = 0
    fitted_prompts: int = 0
    invalid_actions: int = 0
    corrections: int = 0
    teacher_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    new_steps: int = 0
    wall_s: float = 0.0
    steps_per_s: float = 0.0
    # seconds summed over this run's episodes (they overlap under concurrency): building
    # prompts, waiting for the student, in the simulator, in the teacher's reviews
    prompt_s: float = 0.0
    llm_s: float = 0.0
    env_s: float = 0.0
    teacher_s: float = 0.0
    # a reviewed rollout (synthesis): the teacher's name and counters, not episode totals
    teacher: str | None = None
    teacher_stats: TeacherStats | None = None

    def to_dict(self) -> dict:
        """The episode totals, JSON-ready (without the teacher's name and counters)."""
        totals = asdict(self)
        del totals["teacher"], totals["teacher_stats"]
        return totals

    def raise_for_errors(self, what: str) -> None:
        """Raise EpisodeErrors naming every episode that failed."""
        if self.errors:
            listed = "; ".join(f"{key}: {error}" for key, error in sorted(self.errors.items()))
            raise EpisodeErrors(
                f"{what}: {len(self.errors)} episode(s) failed ({listed}); "
                "rerun to retry them, finished episodes are kept"
            )

    def raise_for_failures(self, what: str, max_fraction: float) -> None:
        """Raise EpisodeErrors when more than `max_fraction` of the episodes failed."""
        if self.episodes and self.failed / self.episodes > max_fraction:
            listed = "; ".join(f"{key}: {cause}" for key, cause in sorted(self.failures.items()))
            raise EpisodeErrors(
                f"{what}: {self.failed} of {self.episodes} episodes failed, more than "
                f"rollout.max_failed_fraction={max_fraction} ({listed}); rerun to retry them"
            )


def summarize(
    trajectories: Sequence[Trajectory], new: Sequence[Trajectory], wall_s: float
) -> RolloutSummary:
    """Aggregate counters of finished episodes; throughput counts the `new` ones."""
    count = len(trajectories)
    new_steps = sum(t.num_steps for t in new)
    return RolloutSummary(
        episodes=count,
        new_episodes=len(new),
        mean_reward=sum(t.reward for t in trajectories) / count if count else 0.0,
        success_rate=sum(t.success for t in trajectories) / count if count else 0.0,
        steps=sum(t.num_steps for t in trajectories),
        parse_failures=sum(t.stats.parse_failures for t in trajectories),
        truncated=sum(t.stats.truncated for t in trajectories),
        fitted_prompts=sum(t.stats.fitted_prompts for t in trajectories),
        invalid_actions=sum(t.stats.invalid_actions for t in trajectories),
        corrections=sum(t.stats.corrections for t in trajectories),
        teacher_calls=sum(t.stats.teacher_calls for t in trajectories),
        prompt_tokens=sum(t.stats.prompt_tokens for t in trajectories),
        completion_tokens=sum(t.stats.completion_tokens for t in trajectories),
        failed=sum(1 for t in trajectories if t.failure),
        failures={t.key: t.failure for t in trajectories if t.failure},
        new_steps=new_steps,
        wall_s=round(wall_s, 3),
        steps_per_s=round(new_steps / wall_s, 3) if wall_s > 0 else 0.0,
        **{
            name: round(sum(getattr(t.stats, name) for t in new), 3)
            for name in ("prompt_s", "llm_s", "env_s", "teacher_s")
        },
    )


async def _discard(env: AsyncEnv) -> None:
    """Close an environment that failed; a close that fails too is only logged."""
    try:
        await env.close()
    except Exception:
        log.debug("closing a failed environment failed", exc_info=True)


class _Throughput:
    """Running mean reward and steps/s of the episodes finished in this run."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.rewards: list[float] = []
        self.steps = 0

    def add(self, trajectory: Trajectory) -> str:
        """Count an episode; return the figures to show."""
        self.rewards.append(trajectory.reward)
        self.steps += trajectory.num_steps
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        mean = sum(self.rewards) / len(self.rewards)
        return f"reward {mean:.2f} | {self.steps / elapsed:.2f} steps/s"


async def rollout(
    instances: Sequence[TaskInstance],
    backend: ChatBackend,
    output: str | Path,
    *,
    env_factory: Callable[[], TextEnv],
    settings: EpisodeSettings,
    concurrency: int = 4,
    example_for: ExampleFor | None = None,
    reviewer: Reviewer | None = None,
    max_episodes: int | None = None,
    progress: bool = True,
    episode_attempts: int = 2,
) -> RolloutSummary:
    """Run `backend`'s policy on every instance not yet in `output`; return the totals.

    `max_episodes` stops after that many new episodes (the rest stays for a rerun). An
    episode whose environment crashed for good is started over on a fresh environment, up
    to `episode_attempts` times in all. An episode whose LLM failed is written with its
    `failure` (and retried by the next run). Any other exception (a crash on every
    attempt, a reviewer error) is reported in `errors` and not written, so a rerun tries
    it again.
    """
    started = time.perf_counter()
    wanted = list(dict.fromkeys(instances))
    keys = {instance.key for instance in wanted}
    errors: dict[str, str] = {}
    new: list[Trajectory] = []
    restarts = 0
    with TrajectoryLog(output, retry_failed=True) as trajectories:
        pending = [i for i in wanted if i.key not in trajectories.done]
        skipped = len(wanted) - len(pending)
        if skipped:
            log.info("%s: %d of %d instances already done", output, skipped, len(wanted))
        if trajectories.retried:
            log.info("%s: retrying %d failed episode(s)", output, len(trajectories.retried))
        queue: asyncio.Queue[TaskInstance] = asyncio.Queue()
        for instance in pending:
            queue.put_nowait(instance)
        workers = max(1, min(concurrency, len(pending)))
        stop = asyncio.Event()
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stepflow-env")

        async def episode(instance: TaskInstance, env: AsyncEnv | None):
            """Run one episode; returns (trajectory or None when it failed, the env to reuse)."""
            nonlocal restarts
            loop = asyncio.get_running_loop()
            for attempt in range(1, episode_attempts + 1):
                try:
                    if env is None:
                        env = AsyncEnv(await loop.run_in_executor(executor, env_factory), executor)
                    trajectory = await run_episode(
                        env,
                        instance,
                        backend,
                        settings,
                        example=example_for(instance) if example_for else None,
                        reviewer=reviewer,
                    )
                    return trajectory, env
                except Exception as exc:
                    if env is not None:
                        await _discard(env)
                        env = None
                    if isinstance(exc, EnvCrashed) and attempt < episode_attempts:
                        restarts += 1
                        log.warning(
                            "%s: environment crashed (%s); starting the episode over on a "
                            "fresh environment (attempt %d of %d)",
                            instance.key,
                            exc,
                            attempt + 1,
                            episode_attempts,
                        )
                        continue
                    log.exception("%s: episode failed", instance.key)
                    errors[instance.key] = f"{type(exc).__name__}: {exc}"
                    break
            return None, env

        async def worker() -> None:
            env: AsyncEnv | None = None
            try:
                while not stop.is_set():
                    try:
                        instance = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    trajectory, env = await episode(instance, env)
                    if trajectory is None:
                        continue
                    trajectories.append(trajectory)
                    new.append(trajectory)
                    bar.advance()
                    bar.note(throughput.add(trajectory))
                    if max_episodes is not None and len(new) >= max_episodes:
                        stop.set()
            finally:
                if env is not None:
                    await env.close()

        try:
            throughput = _Throughput()
            with progress_bar("episodes", len(pending), progress and bool(pending)) as bar:
                await asyncio.gather(*(worker() for _ in range(workers)))
        finally:
            executor.shutdown(wait=True)
        finished = [trajectories.done[i.key] for i in wanted if i.key in trajectories.done]
    summary = summarize(finished, new, time.perf_counter() - started)
    summary.skipped = skipped
    summary.errors = errors
    summary.env_restarts = restarts + sum(t.stats.env_restarts for t in new)
    summary.remaining = len(keys) - len(finished)
    return summary
