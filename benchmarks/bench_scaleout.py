"""Rollout throughput on a Dask LocalCluster: episodes/min with 1 and 2 worker processes.

    python benchmarks/bench_scaleout.py [--workers 1,2] [--instances 8] [--step-limit 5]

The untrained embedded student runs greedy episodes on the same ScienceWorld training
instances (the task types of params.yaml), in as many shards as workers, each worker one
episode at a time (`rollout.concurrency: 1`) with its own model copy and simulator. The time
counted is the whole stage as a user sees it: cluster start, model loads, episodes, merge.
Writes benchmarks/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from stepflow.config import load_params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.trajectory import read_trajectories
from stepflow.envs.base import TaskInstance
from stepflow.provenance import code_version, utc_now
from stepflow.rollout.job import RolloutJob
from stepflow.rollout.shards import run_stage

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scaleout.json"


def main() -> None:
    """Run the benchmark and write its results."""
    from tasks.scaleout import _api_url, shard_map

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="Dask worker counts to compare")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--step-limit", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = load_params(args.params)
    types = base.env.task_types
    instances = [
        TaskInstance("scienceworld", types[n % len(types)], n // len(types), "train")
        for n in range(args.instances)
    ]
    _api_url()  # start Prefect's temporary API once, outside the timings
    runs = {}
    for workers in (int(w) for w in args.workers.split(",")):
        params = load_params(
            args.params,
            {
                "scaleout.task_runner": "dask",
                "scaleout.workers": workers,
                "rollout.concurrency": 1,
                "env.step_limit": args.step_limit,
                "env.step_limits": {},
                "agent.one_shot": False,
                "student.generation.max_new_tokens": args.max_new_tokens,
            },
        )
        with tempfile.TemporaryDirectory() as scratch:
            work_log = Path(scratch) / "episodes.jsonl"
            job = RolloutJob(params, instances, work_log, params_hash="bench")
            started = time.perf_counter()
            result = run_stage(job, shard_map=shard_map(params))
            seconds = time.perf_counter() - started
            episodes = list(read_trajectories(work_log))
        assert len(episodes) == len(instances), result.errors
        steps = sum(t.num_steps for t in episodes)
        runs[str(workers)] = {
            "episodes": len(episodes),
            "steps": steps,
            "seconds": round(seconds, 2),
            "episodes_per_min": round(60 * len(episodes) / seconds, 3),
            "steps_per_s": round(steps / seconds, 3),
        }
        print(f"{workers} Dask worker(s): {runs[str(workers)]}")
    counts = sorted(runs, key=int)
    low, high = runs[counts[0]], runs[counts[-1]]
    result = {
        "benchmark": "scaleout",
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "task_runner": "dask LocalCluster, processes, 1 thread each",
        "task_types": types,
        "step_limit": args.step_limit,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
        "speedup": round(high["episodes_per_min"] / low["episodes_per_min"], 2),
    }
    atomic_write_json(args.out, result)
    print(f"speedup {counts[-1]} vs {counts[0]} workers: {result['speedup']}x → {args.out}")


if __name__ == "__main__":
    main()
