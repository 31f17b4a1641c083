"""One seed of the study: where it writes, its overrides, which of its stages are done (their
outputs match their inputs), the time its stages took, and the deadline of a chunk."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    """Wall seconds per stage of one seed, added up over the chunks that ran it.

    `running(stage)` saves the stage's time every `heartbeat_s` while it runs, so a chunk
    killed in the middle of a stage (a session's end, SIGKILL) keeps what it ran, to within
    one heartbeat; a stage that raises counts too.
    """

    def __init__(self, path: Path, heartbeat_s: float = 30.0) -> None:
        self.path = path
        self.heartbeat_s = heartbeat_s

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per stage, as saved."""
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _save(self, stage: str, seconds: float) -> None:
        atomic_write_json(self.path, {**self.seconds, stage: round(seconds, 1)})

    @contextmanager
    def running(self, stage: str) -> Iterator[None]:
        """Count the wall time of the block as `stage`'s, saved as it goes."""
        before = self.seconds.get(stage, 0.0)
        began = time.perf_counter()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                self._save(stage, before + time.perf_counter() - began)

        beater = threading.Thread(target=beat, name=f"timings-{stage}", daemon=True)
        beater.start()
        try:
            yield
        finally:
            stop.set()
            beater.join()
            self._save(stage, before + time.perf_counter() - began)


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
