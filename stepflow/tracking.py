"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Stages of a pipeline may run in separate processes (DVC runs each stage's flow in its own
process), so the open parent run is remembered in `.stepflow/pipeline_run-<paths hash>.json`
(one per set of output paths, so that runs writing elsewhere keep their own parent): a stage
nests under it while it is running, and the `report` stage (or `end_pipeline_run`) closes it.
A stage started alone opens a new parent.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from stepflow.config import Params, TrackingConfig
from stepflow.jsonl import atomic_write_json
from stepflow.locking import exclusive
from stepflow.provenance import code_version, file_sha256

log = logging.getLogger(__name__)

PIPELINE_RUN_NAME = "step_pipeline"


def pipeline_state(params: Params) -> Path:
    """Where the open parent run of the pipeline writing to `params.paths` is remembered."""
    return Path(".stepflow") / f"pipeline_run-{params.section_hash('paths')}.json"


def configure(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.tracking_uri
    mlflow.set_tracking_uri(uri)
    # runs started at the same time must not both create a new SQLite store (its schema
    # migration is not concurrency-safe) or both create the experiment
    guard = nullcontext()
    if uri.startswith("sqlite:///"):
        guard = exclusive(Path(uri.removeprefix("sqlite:///") + ".lock"))
    with guard:
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            location = Path(tracking.artifact_location).resolve().as_uri()
            experiment_id = mlflow.create_experiment(
                tracking.experiment, artifact_location=location
            )
        else:
            experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as `a.b.c: value` strings (lists JSON-encoded)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def _open_parent(experiment_id: str, state_file: Path, tags: dict[str, str]) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        try:
            run = client.get_run(state["run_id"])
            if run.info.status == "RUNNING" and run.info.experiment_id == experiment_id:
                return run.info.run_id
        except Exception:  # a deleted or foreign run: start a new parent
            log.debug("stale pipeline run state %s", state_file, exc_info=True)
    run = client.create_run(
        experiment_id, run_name=PIPELINE_RUN_NAME, tags={"stepflow.kind": "pipeline", **tags}
    )
    atomic_write_json(state_file, {"run_id": run.info.run_id})
    return run.info.run_id


@contextmanager
def stage_run(
    params: Params,
    stage: str,
    *,
    tags: Mapping[str, str] | None = None,
    state_file: Path | None = None,
) -> Iterator[Any]:
    """A nested MLflow run for one stage under the pipeline's parent run."""
    import mlflow
    from mlflow import MlflowClient

    experiment_id = configure(params.tracking)
    common = {
        "stepflow.code_version": code_version(),
        "stepflow.params_hash": params.section_hash(),
    }
    common.update(tags or {})
    parent_id = _open_parent(experiment_id, state_file or pipeline_state(params), common)
    MlflowClient().set_tag(parent_id, "stepflow.last_stage", stage)
    with mlflow.start_run(
        run_name=stage,
        parent_run_id=parent_id,
        tags={"stepflow.stage": stage, "stepflow.kind": "stage", **common},
    ) as run:
        mlflow.log_params(flatten(params.model_dump(mode="json")))
        yield run


def end_pipeline_run(
    params: Params, status: str = "FINISHED", state_file: Path | None = None
) -> str | None:
    """Close the open parent run of `params`' pipeline, if any; return its id."""
    from mlflow import MlflowClient

    state_file = state_file or pipeline_state(params)
    if not state_file.is_file():
        return None
    run_id = json.loads(state_file.read_text())["run_id"]
    try:
        MlflowClient().set_terminated(run_id, status=status)
    finally:
        state_file.unlink(missing_ok=True)
    return run_id


def log_dataset(path: str | Path, name: str, context: str) -> str:
    """Record a data file as an MLflow dataset input (name, sha256 digest, source path)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digest = file_sha256(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest[:16]), context=context)
    return digest


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics to the active run (names sanitised for MLflow)."""
    import mlflow

    clean = {_metric_name(k): float(v) for k, v in metrics.items()}
    mlflow.log_metrics(clean, step=step)


def _metric_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ :" else "_" for ch in name)
