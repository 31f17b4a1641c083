"""Training throughput by batching mode: padding-free packing vs length grouping vs padding.

Trains the same short run (same data, params, steps) once per `training.packing` mode through
`stepflow.training.train_variant` and compares real (non-pad) tokens per second.

    python benchmarks/bench_training.py [--threads 1] [--steps 4] [--batch-size 4] [--repeats 2]

Length grouping needs enough trajectories to group (transformers sorts mega-batches of
min(50, n / (4 * batch)) batches), hence the 64 by default.

Writes benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from stepflow.config import load_params
from stepflow.jsonl import atomic_write_json
from stepflow.modeling import device
from stepflow.provenance import code_version, utc_now
from stepflow.training import train_variant
from stepflow.trajectory import Provenance, Trajectory, Turn, write_trajectories

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "training.json"
MODES = ("padding_free", "length_grouped", "none")
OBJECTS = ["battery", "spoon", "elephant", "red box", "thermometer", "bee", "fridge", "door"]
ROOMS = ["kitchen", "workshop", "hallway", "outside", "greenhouse", "bathroom"]


def synthetic_trajectory(rng: random.Random, variation: int, max_steps: int) -> Trajectory:
    """A ScienceWorld-style golden trajectory of random length (1 to `max_steps` steps)."""
    room = rng.choice(ROOMS)
    turns = [
        Turn(role="system", kind="system", content="You are an agent in ScienceWorld."),
        Turn(
            role="user",
            kind="instruction",
            content=f"Task: find a(n) non-living thing and move it to the box in the {room}.\n"
            f"Observation: This room is called the hallway. You see: "
            + ", ".join(rng.sample(OBJECTS, 4)),
        ),
    ]
    steps = rng.randint(1, max_steps)
    for _ in range(steps):
        thing, place = rng.choice(OBJECTS), rng.choice(ROOMS)
        turns.append(
            Turn(
                role="assistant",
                kind="step",
                loss=True,
                content=f"Thought: the {thing} may help, it is in the {place}.\n"
                f"Action: go to {place}",
            )
        )
        seen = ", ".join(rng.sample(OBJECTS, rng.randint(2, 6)))
        turns.append(
            Turn(
                role="user",
                kind="observation",
                content=f"Observation: You move to the {place}. In it, you see: {seen}.",
            )
        )
    return Trajectory(
        env="scienceworld",
        task_type="find-non-living-thing",
        variation=variation,
        split="u1",
        instruction=f"find a non-living thing ({room})",
        turns=turns,
        reward=1.0,
        score=100.0,
        success=True,
        num_steps=steps,
        provenance=Provenance(source="golden"),
    )


def run(mode: str, workdir: Path, steps: int, batch_size: int) -> dict:
    """One short training run; its throughput figures."""
    params = load_params(
        ROOT / "params.yaml",
        {
            "paths.data": str(workdir / "data"),
            "paths.models": str(workdir / "models"),
            "training.packing": mode,
            "training.max_steps": steps,
            "training.batch_size": batch_size,
            "training.gradient_accumulation_steps": 1,
            "training.max_seq_len": 512,
            "training.lora.r": 8,
            "training.save_steps": 10_000,
        },
    )
    began = time.perf_counter()
    result = train_variant(
        params, "init_sft", work_root=workdir / "work", resume=False, out_dir=workdir / mode
    )
    logs = [entry for entry in result.log_history if "loss" in entry]
    return {
        "tokens_per_second": round(result.tokens_per_second, 2),
        "train_seconds": round(result.train_seconds, 2),
        "seconds_per_step": round(result.train_seconds / result.global_step, 3),
        "padding_fraction": round(sum(e["padding_fraction"] for e in logs) / len(logs), 4),
        "steps": result.global_step,
        "wall_seconds_with_load": round(time.perf_counter() - began, 2),
    }


def main() -> None:
    """Run every mode `--repeats` times (interleaved), keep each mode's best run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=8, help="steps per trajectory, at most")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="stepflow-bench-"))
    try:
        rng = random.Random(0)
        data = [synthetic_trajectory(rng, i, args.max_turns) for i in range(args.trajectories)]
        write_trajectories(workdir / "data" / "golden_d1.jsonl", data)
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run(mode, workdir, args.steps, args.batch_size))
                print(mode, runs[mode][-1], file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    best = {mode: max(r, key=lambda x: x["tokens_per_second"]) for mode, r in runs.items()}
    base = best["none"]["tokens_per_second"]
    report = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": {
            "device": device(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "setup": {
            "model": "embedded",
            "method": "qlora",
            "lora_r": 8,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "trajectories": args.trajectories,
            "max_turns": args.max_turns,
            "repeats": args.repeats,
        },
        "best": best,
        "runs": runs,
        "speedup_vs_padding": {
            mode: round(best[mode]["tokens_per_second"] / base, 3) for mode in MODES
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, report)
    print(RESULTS)
    for mode in MODES:
        print(
            f"{mode:>15}: {best[mode]['tokens_per_second']:8.1f} tokens/s "
            f"(x{report['speedup_vs_padding'][mode]:.2f} vs padding), "
            f"padding {best[mode]['padding_fraction']:.1%}"
        )


if __name__ == "__main__":
    main()
