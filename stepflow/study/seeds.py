"""One seed of the study: where it writes, its overrides, which of its stages are done (their
outputs match their inputs), the time its stages took, and the deadline of a chunk."""

from __future__ import annotations

import json
import time
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
