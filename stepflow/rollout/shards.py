"""Episodes of a stage in shards: a deterministic split, one worker per shard, one merge.

A stage (synthesis, evaluation) describes its episodes once as a `RolloutSpec`: picklable,
paths absolute, so any worker process (a Dask or Ray worker, on this machine or another
that shares the file system) can run a shard of instances with it. Each shard appends its
episodes to its own file under `<work dir>/shards/`; the merge appends every episode not
yet in the stage's work log to it, so the log holds exactly one trajectory per instance
whatever the shard count. A rerun first merges what an interrupted run left, then splits
only the instances still missing (or recorded as failed); shard files are removed once
merged.

How shards are executed is the caller's: a `ShardMap` takes the jobs and returns their
results (in process here; on a Prefect task runner in `tasks/`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from stepflow.config import LLMConfig, Params
from stepflow.data.prepare import example_for, load_examples
from stepflow.data.trajectory import Trajectory, TrajectoryLog, read_trajectories
from stepflow.envs.base import TaskInstance
from stepflow.rollout.engine import RolloutSummary, run_rollout, summarize
from stepflow.rollout.episode import Source
from stepflow.teacher.base import TeacherStats

SHARD_DIR = "shards"


@dataclass
class ShardResult:
    """What a shard (or an in-process rollout) returns: its totals and the teacher's."""

    summary: RolloutSummary
    teacher: str | None = None
    teacher_stats: TeacherStats | None = None


@dataclass(frozen=True)
class RolloutSpec:
    """How a stage runs its episodes: model, adapter, prompts and (for synthesis) the teacher
    that reviews each step against the golden trajectories of `data_dir`."""

    params: Params
    student: LLMConfig
    adapter: Path | None
    source: Source
    params_hash: str
    data_dir: Path
    review: bool = False

    def run(
        self,
        instances: Sequence[TaskInstance],
        output: Path,
        *,
        progress: bool = True,
        concurrency: int | None = None,
    ) -> ShardResult:
        """Run the episodes of `instances` not yet in `output` (resumable)."""
        from stepflow.data.prepare import load_prepared
        from stepflow.teacher import make_teacher
        from stepflow.teacher.reviewer import TeacherReviewer

        teacher = reviewer = None
        if self.review:
            _, _, d2 = load_prepared(self.data_dir)
            teacher = make_teacher(self.params.teacher)
            references = {t.key: t for t in d2}
            reviewer = TeacherReviewer(teacher, references, self.params.synthesis.rewind)
        summary = run_rollout(
            self.params,
            instances,
            output,
            adapter=self.adapter,
            student=self.student,
            example_for=functools.partial(example_for, load_examples(self.data_dir)),
            reviewer=reviewer,
            source=self.source,
            params_hash=self.params_hash,
            concurrency=concurrency,
            progress=progress,
            cleanup=teacher.aclose if teacher is not None else None,
        )
        if teacher is None:
            return ShardResult(summary)
        return ShardResult(summary, teacher.name, teacher.stats)


@dataclass(frozen=True)
class ShardJob:
    """One shard: instances of a stage and the file its episodes go to."""

    spec: RolloutSpec
    instances: tuple[TaskInstance, ...]
    output: Path
    index: int
    count: int

    @property
    def name(self) -> str:
        """`shard i/n` for logs and task names."""
        return f"shard {self.index + 1}/{self.count}"

    def run(self) -> ShardResult:
        """Run this shard's episodes (on whichever worker calls it)."""
        return self.spec.run(self.instances, self.output, progress=False)


ShardMap = Callable[[Sequence[ShardJob]], list[ShardResult]]


def run_here(jobs: Sequence[ShardJob]) -> list[ShardResult]:
    """Run shards one after the other in this process."""
    return [job.run() for job in jobs]


def split_shards(instances: Sequence[TaskInstance], count: int) -> list[list[TaskInstance]]:
    """Deal instances (sorted by key) round robin into at most `count` non-empty shards, so
    each shard gets a similar mix of task types; the same input always gives the same split."""
    if count < 1:
        raise ValueError(f"shard count must be positive, got {count}")
    ordered = sorted(dict.fromkeys(instances), key=lambda i: i.key)
    shards = [ordered[n::count] for n in range(count)]
    return [shard for shard in shards if shard]


def merge_shards(work_log: Path, shard_dir: Path) -> list[Trajectory]:
    """Append the episodes of every shard file not yet in `work_log` (a shard's unfinished
    last line, left by a killed worker, is dropped), then remove the shard files; return the
    episodes appended."""
    files = sorted(shard_dir.glob("shard-*.jsonl")) if shard_dir.is_dir() else []
    added: list[Trajectory] = []
    if not files:
        return added
    with TrajectoryLog(work_log) as log:
        for path in files:
            with TrajectoryLog(path) as shard:  # cuts a line a killed worker left unfinished
                for trajectory in shard.done.values():
                    if trajectory.key not in log.done:
                        log.append(trajectory)
                        added.append(trajectory)
    for path in files:
        path.unlink()
    return added


def merged_teacher_stats(results: Sequence[ShardResult]) -> TeacherStats | None:
    """The teacher counters of all shards added up (None when no shard had a teacher)."""
    parts = [r.teacher_stats for r in results if r.teacher_stats is not None]
    if not parts:
        return None
    total = TeacherStats()
    for part in parts:
        for item in fields(TeacherStats):
            if item.name != "reasons":
                setattr(total, item.name, getattr(total, item.name) + getattr(part, item.name))
        for reason, count in part.reasons.items():
            total.reasons[reason] = total.reasons.get(reason, 0) + count
    return total


def run_stage(
    spec: RolloutSpec,
    instances: Sequence[TaskInstance],
    work_log: Path,
    *,
    shard_map: ShardMap | None = None,
    progress: bool = True,
) -> ShardResult:
    """Run a stage's episodes into `work_log`: in process without a `shard_map`, else split
    into `scaleout.shards` shards run by `shard_map` and merged (see the module docstring)."""
    if shard_map is None:
        return spec.run(instances, work_log, progress=progress)
    started = time.perf_counter()
    work_log = Path(work_log).resolve()
    shard_dir = work_log.parent / SHARD_DIR
    merge_shards(work_log, shard_dir)  # what an interrupted run left
    wanted = list(dict.fromkeys(instances))
    with TrajectoryLog(work_log, retry_failed=True) as log:  # failed episodes run again
        done = set(log.done)
    pending = [i for i in wanted if i.key not in done]
    parts = split_shards(pending, spec.params.scaleout.shard_count) if pending else []
    jobs = [
        ShardJob(spec, tuple(part), shard_dir / f"shard-{n:03d}.jsonl", n, len(parts))
        for n, part in enumerate(parts)
    ]
    if jobs:
        shard_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = list(shard_map(jobs)) if jobs else []
    finally:
        merge_shards(work_log, shard_dir)
    by_key = {t.key: t for t in read_trajectories(work_log)} if work_log.is_file() else {}
    finished = [by_key[i.key] for i in wanted if i.key in by_key]
    new_keys = {i.key for i in pending}
    summary = summarize(
        finished, [t for t in finished if t.key in new_keys], time.perf_counter() - started
    )
    summary.skipped = len(wanted) - len(pending)
    summary.remaining = len(wanted) - len(finished)
    for result in results:
        summary.errors.update(result.summary.errors)
        summary.env_restarts += result.summary.env_restarts
    teacher = next((r.teacher for r in results if r.teacher), None)
    return ShardResult(summary, teacher, merged_teacher_stats(results))
