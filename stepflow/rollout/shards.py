"""Episodes of a stage in shards: a deterministic split, one worker per shard, one merge.

A stage (synthesis, evaluation) describes its episodes once as a `RolloutJob`: picklable,
paths absolute, so any worker process (a Dask or Ray worker, on this machine or another
that shares the file system) can run a shard of it: the same job on a part of the instances,
into its own file under `<work dir>/shards/`. The merge appends every episode not yet in the
stage's work log to it, so the log holds exactly one trajectory per instance whatever the
shard count. A rerun first merges what an interrupted run left, then splits only the
instances still missing (or recorded as failed); shard files are removed once merged.

How shards are executed is the caller's: a `ShardMap` takes the jobs and returns their
summaries (in process here; on a Prefect task runner in `tasks/`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from stepflow.data.trajectory import Trajectory, TrajectoryLog, read_trajectories
from stepflow.envs.base import TaskInstance
from stepflow.rollout.engine import RolloutSummary, summarize
from stepflow.rollout.job import RolloutJob
from stepflow.teacher.base import TeacherStats

SHARD_DIR = "shards"


ShardMap = Callable[[Sequence[RolloutJob]], list[RolloutSummary]]


def run_here(jobs: Sequence[RolloutJob]) -> list[RolloutSummary]:
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


def merged_teacher_stats(results: Sequence[RolloutSummary]) -> TeacherStats | None:
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


def run_stage(job: RolloutJob, *, shard_map: ShardMap | None = None) -> RolloutSummary:
    """Run a stage's episodes into its work log (`job.output`): in process without a
    `shard_map`, else split into `scaleout.shards` shards run by `shard_map` and merged (see
    the module docstring)."""
    if shard_map is None:
        return job.run()
    started = time.perf_counter()
    work_log = job.output.resolve()
    shard_dir = work_log.parent / SHARD_DIR
    merge_shards(work_log, shard_dir)  # what an interrupted run left
    wanted = list(dict.fromkeys(job.instances))
    with TrajectoryLog(work_log, retry_failed=True) as log:  # failed episodes run again
        done = set(log.done)
    pending = [i for i in wanted if i.key not in done]
    parts = split_shards(pending, job.params.scaleout.shard_count) if pending else []
    jobs = [
        job.shard(tuple(part), shard_dir / f"shard-{n:03d}.jsonl", n, len(parts))
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
        summary.errors.update(result.errors)
        summary.env_restarts += result.env_restarts
    summary.teacher = next((r.teacher for r in results if r.teacher), None)
    summary.teacher_stats = merged_teacher_stats(results)
    return summary
