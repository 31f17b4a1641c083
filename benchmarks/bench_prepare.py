"""Golden-trajectory preparation throughput with 1 and 2 environment worker processes.

    python benchmarks/bench_prepare.py [--workers 1,2] [--params params.yaml]

Prepares the default subset of params.yaml from scratch (fresh work directory, fresh
output directory) once per worker count; writes benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from stepflow.config import load_params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.prepare import prepare
from stepflow.provenance import code_version, utc_now

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "prepare.json"


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    params_path = args.params.resolve()
    runs = {}
    for workers in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            cwd = Path.cwd()
            os.chdir(scratch)
            try:
                params = load_params(params_path)
                summary = prepare(
                    params, workers=workers, show_progress=False, work_root=Path(scratch) / "work"
                )
            finally:
                os.chdir(cwd)
        runs[str(workers)] = {
            "episodes": summary.replayed,
            "seconds": round(summary.seconds, 2),
            "episodes_per_s": round(summary.episodes_per_s, 3),
            "kept": summary.kept,
            "dropped": len(summary.dropped),
        }
        print(f"{workers} worker(s): {runs[str(workers)]}")
    counts = sorted(runs, key=int)
    result = {
        "benchmark": "prepare",
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "task_types": load_params(params_path).env.task_types,
        "runs": runs,
        "speedup": round(runs[counts[-1]]["episodes_per_s"] / runs[counts[0]]["episodes_per_s"], 2),
    }
    atomic_write_json(args.out, result)
    print(f"speedup {counts[-1]} vs {counts[0]} workers: {result['speedup']}x → {args.out}")


if __name__ == "__main__":
    main()
