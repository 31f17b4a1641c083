"""The task-space split of the method and its manifest.

Training instances U (from the environment's official train split) are cut per task type
into U1 (golden SFT, D1) and U2 (self-reflection synthesis) by a seeded fraction; test and
dev instances come from the official test and dev splits, or from ETO's fixed lists
(`splits.instances: eto`; read from package data). An environment whose splits come from
data folders (ALFWorld: `train/` or `valid_train/`) names them in the manifest's `sources`.
Every choice is deterministic for a seed and independent of the order task types are
listed in.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from stepflow.config import Params
from stepflow.envs.base import TaskInstance
from stepflow.data.jsonl import DataError, atomic_write_text
from stepflow.method import MANIFEST_PARAMS
from stepflow.evaluate.protocols import eto_variations
from stepflow.data.trajectory import Split

MANIFEST_VERSION = 1


class SplitSource(Protocol):
    """What the split logic needs from an environment."""

    name: str

    def task_types(self) -> list[str]: ...

    def variations(self, task_type: str, split: Literal["train", "dev", "test"]) -> list[int]: ...


class ManifestEntry(BaseModel):
    """One instance and the split it belongs to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str
    task_type: str
    variation: int
    split: Split

    def instance(self) -> TaskInstance:
        """As a TaskInstance."""
        return TaskInstance(self.env, self.task_type, self.variation, self.split)


class Manifest(BaseModel):
    """Every instance of a run with its split."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = MANIFEST_VERSION
    env: str
    simplification: str
    seed: int
    params_hash: str
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="split → where the environment took its instances from (ALFWorld: "
        "the json_2.1.1/ folder, e.g. train: valid_train); empty for built-in task spaces",
    )
    instances: list[ManifestEntry] = Field(min_length=1)

    def select(self, *splits: Split, task_types: list[str] | None = None) -> list[TaskInstance]:
        """Instances of the given splits (optionally of some task types), in manifest order."""
        return [
            entry.instance()
            for entry in self.instances
            if entry.split in splits and (task_types is None or entry.task_type in task_types)
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        """Instances per task type and split."""
        table: dict[str, Counter] = {}
        for entry in self.instances:
            table.setdefault(entry.task_type, Counter())[entry.split] += 1
        return {task: dict(counter) for task, counter in table.items()}


def _seeded_sample(values: list[int], k: int | None, *key: object) -> list[int]:
    rng = random.Random(":".join(str(part) for part in key))
    shuffled = sorted(values)
    rng.shuffle(shuffled)
    return shuffled if k is None else shuffled[:k]


def split_train(
    variations: list[int], fraction: float, *key: object
) -> tuple[list[int], list[int]]:
    """Cut training variations into (U1, U2) by a seeded fraction; both non-empty when n >= 2."""
    shuffled = _seeded_sample(variations, None, *key, "u1u2")
    n = len(shuffled)
    n_u1 = round(fraction * n)
    if n >= 2:
        n_u1 = min(max(n_u1, 1), n - 1)
    return sorted(shuffled[:n_u1]), sorted(shuffled[n_u1:])


def evaluation_variations(
    source: SplitSource, params: Params, task: str, split: Literal["dev", "test"]
) -> list[int]:
    """The dev or test variations a task type draws from: the official split, or ETO's
    list under `splits.instances: eto`."""
    if params.splits.instances == "eto":
        if hasattr(source, "eto_variations"):  # the environment maps ETO's list (ALFWorld)
            return source.eto_variations(task, split)  # type: ignore[attr-defined]
        return eto_variations(task, split)
    return source.variations(task, split)


def manifest_hash(params: Params) -> str:
    """Hash of the settings the manifest depends on (`stepflow.method.MANIFEST_PARAMS`)."""
    return params.section_hash(*MANIFEST_PARAMS.keys(params))


def build_manifest(source: SplitSource, params: Params) -> Manifest:
    """Draw the instances of every configured task type and assign U1/U2/dev/test."""
    known = set(source.task_types())
    unknown = [t for t in params.env.task_types if t not in known]
    if unknown:
        raise ValueError(f"env.task_types: unknown {source.name} task types {unknown}")
    seed, cfg = params.seed, params.splits
    drawn = seed if cfg.evaluation_seed is None else cfg.evaluation_seed  # dev/test draws
    entries: list[ManifestEntry] = []
    for task in params.env.task_types:
        train = _seeded_sample(source.variations(task, "train"), cfg.train_per_task, seed, task)
        u1, u2 = split_train(train, cfg.u1_fraction, seed, task)
        listed = evaluation_variations(source, params, task, "test")
        test = _seeded_sample(listed, cfg.test_per_task, drawn, task)
        dev: list[int] = []
        if cfg.dev_per_task != 0:
            listed = evaluation_variations(source, params, task, "dev")
            dev = _seeded_sample(listed, cfg.dev_per_task, drawn, task)
        for split, variations in (("u1", u1), ("u2", u2), ("dev", dev), ("test", sorted(test))):
            for variation in variations:
                entries.append(
                    ManifestEntry(env=source.name, task_type=task, variation=variation, split=split)
                )
        if not u1 or not u2:
            raise ValueError(
                f"splits: task type {task!r} has {len(train)} training instance(s); "
                "U1 and U2 each need at least one (raise splits.train_per_task)"
            )
    return Manifest(
        env=source.name,
        simplification=params.env.simplification,
        seed=seed,
        params_hash=manifest_hash(params),
        sources=_sources(source, params),
        instances=entries,
    )


def _sources(source: SplitSource, params: Params) -> dict[str, str]:
    """Where each split's instances come from, when the environment says."""
    named = getattr(source, "split_sources", None)
    return {} if named is None else dict(named(params.splits.instances))


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    """Write the manifest atomically."""
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the prepare stage first)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: invalid manifest: {exc}") from None
