"""A training run's identity and its resume: the data files a variant trains on, the run key
(a hash of everything that determines the result) that names the run's work directory, the
newest complete checkpoint to resume from, and the pruning of earlier runs' checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from stepflow.config import Params, get_by_path, set_by_path
from stepflow.method import TRAINING_PARAMS
from stepflow.method import variant as variant_spec

TARGET_FILE = "target"  # in a run's work directory: the output directory it trains for


def variant_files(params: Params, variant: str) -> list[Path]:
    """The data files a variant trains on, checked to exist."""
    paths = [params.paths.data / name for name in variant_spec(variant).files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"variant {variant!r} needs missing data file(s): {missing}")
    return paths


def run_key(params: Params, variant: str, data_hashes: dict[str, str]) -> str:
    """A hash of everything that determines a training run's result: the variant, its data
    and the params keys of `stepflow.method.TRAINING_PARAMS` (training params except
    checkpoint and logging intervals and threads, base model, seed; the agent's prompt
    budget when rows are fitted to it)."""
    declared = TRAINING_PARAMS
    data = params.model_dump(mode="json")
    identity: dict[str, Any] = {
        "variant": variant,
        "mask_erroneous": variant_spec(variant).mask_erroneous,
        "data": data_hashes,
    }
    for key in declared.digest:
        set_by_path(identity, key, get_by_path(data, key))
    for key in declared.excluded:
        parent, _, name = key.rpartition(".")
        get_by_path(identity, parent).pop(name)
    budget = [key for key in declared.keys(params) if key in declared.conditional]
    if budget:  # rows are fitted to the agent's prompt budget
        identity["prompt_budget"] = {
            key.rpartition(".")[2]: get_by_path(data, key) for key in budget
        }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (its trainer state, written last, parses)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        try:
            step = int(path.name.rsplit("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, path))
    return max(found)[1] if found else None


def prune_stale_runs(work_dir: Path) -> None:
    """Delete the checkpoints of earlier runs of the same variant (other data or params)
    that trained for the same output directory; runs for other outputs (another seed of a
    study, another `paths.models`) are left alone."""
    variant_prefix = work_dir.name.rsplit("-", 1)[0] + "-"
    target = (work_dir / TARGET_FILE).read_text()
    for other in work_dir.parent.glob(f"{variant_prefix}*"):
        suffix = other.name[len(variant_prefix) :]
        marker = other / TARGET_FILE
        if (
            other != work_dir
            and "-" not in suffix
            and marker.is_file()
            and marker.read_text() == target
        ):
            shutil.rmtree(other, ignore_errors=True)
