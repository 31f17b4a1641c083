"""One seed of the study: where it writes, its overrides, which of its stages are done (their
outputs match their inputs), the time its stages took, and the deadline of a chunk."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepflow import method
from stepflow.config import Params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.trajectory import read_trajectories
from stepflow.method import EXAMPLES, GOLDEN_D1, GOLDEN_D2, MANIFEST, MODEL_CARD, RESULTS

PATH_KEYS = ("data", "models", "metrics", "reports")
TIMINGS = "timings.json"


def seed_dir(params: Params, seed: int) -> Path:
    """Where one seed of the study writes."""
    return Path(params.study.root) / f"seed-{seed}"


def seed_overrides(params: Params, seed: int) -> dict[str, Any]:
    """The overrides that turn the study's params into one seed's run."""
    base = seed_dir(params, seed)
    return {"seed": seed, **{f"paths.{key}": str(base / key) for key in PATH_KEYS}}


# -- which stages are done ------------------------------------------------------------------
def prepared(params: Params) -> bool:
    """Whether prepare's outputs exist and came from these settings."""
    from stepflow.data.prepare import prepare_hash

    data = Path(params.paths.data)
    names = (MANIFEST, GOLDEN_D1, GOLDEN_D2, EXAMPLES)
    if not all((data / name).is_file() for name in names):
        return False
    first = next(iter(read_trajectories(data / GOLDEN_D1)), None)
    return first is not None and first.provenance.params_hash == prepare_hash(params)


def trained(params: Params, variant: str) -> bool:
    """Whether `<paths.models>/<variant>` was trained on the current data with these settings."""
    from stepflow.provenance import file_sha256
    from stepflow.train.runs import run_key, variant_files

    card = method.variant(variant).output_dir(params.paths.models) / MODEL_CARD
    if not card.is_file():
        return False
    try:
        hashes = {path.name: file_sha256(path) for path in variant_files(params, variant)}
    except FileNotFoundError:
        return False
    key = f"train-{variant}-{run_key(params, variant, hashes)}"
    return json.loads(card.read_text()).get("run_key") == key


def reported(params: Params) -> bool:
    """Whether the seed's report exists and is newer than every agent's metrics."""
    report = Path(params.paths.reports) / RESULTS
    metrics = [Path(params.paths.metrics) / f"{a}.json" for a in params.evaluation.agents]
    if not report.is_file():
        return False
    written = report.stat().st_mtime
    return all(m.is_file() and m.stat().st_mtime <= written for m in metrics)


class Timings:
    """Wall seconds per stage of one seed, added up over the chunks that ran it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 1)
        atomic_write_json(self.path, self.seconds)


@dataclass
class Deadline:
    """The end of a chunk: no stage starts after it (a running stage finishes)."""

    at: float | None

    @classmethod
    def after_hours(cls, hours: float | None) -> Deadline:
        return cls(None if hours is None else time.monotonic() + hours * 3600)

    @property
    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def run_seed_processes(
    params_path: str,
    overrides: list[str],
    seeds: Sequence[int],
    params: Params,
    hours: float | None = None,
) -> dict[int, int]:
    """Run each seed's `stepflow study run --seed N` in a process of its own, up to
    `study.parallel` at once, each logging to `<seed dir>/study.log`; their exit codes.
    No seed starts after `hours`, and each gets what is left of them."""
    import os
    import subprocess
    import sys

    # each process's torch gets its share of the cores: oversubscribed threads spin and
    # slow every process down (README: Benchmarks)
    threads = str(max(1, (os.cpu_count() or 1) // params.study.parallel))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
    }
    deadline = Deadline.after_hours(hours)
    pending = list(seeds)
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    codes: dict[int, int] = {}
    try:
        while pending or running:
            while pending and len(running) < params.study.parallel and not deadline.passed:
                seed = pending.pop(0)
                command = [sys.executable, "-m", "stepflow.cli", "study", "run"]
                command += ["-p", params_path, f"--seed={seed}", "--no-summary"]
                if deadline.at is not None:
                    left = max(0.0, deadline.at - time.monotonic()) / 3600
                    command += [f"--hours={left:.4f}"]
                for override in overrides:
                    command += ["-S", override]
                log = seed_dir(params, seed) / "study.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                handle = log.open("a")
                print(f"seed {seed}: started, log in {log}")
                proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
                running[seed] = (proc, handle)
            if deadline.passed and pending:
                print(f"seeds {pending} not started: the {hours} h are up")
                pending.clear()
            time.sleep(2)
            for seed, (proc, handle) in list(running.items()):
                if proc.poll() is not None:
                    handle.close()
                    codes[seed] = proc.returncode
                    del running[seed]
                    print(f"seed {seed}: exit {proc.returncode}")
    finally:
        for proc, handle in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
    return codes
