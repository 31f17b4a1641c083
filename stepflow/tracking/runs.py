"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

A pipeline run is `dvc repro` (each stage in its own process: DVC sets `DVC_STAGE`) or the
`step_pipeline` flow (`pipeline_run` in one process). Its parent run is remembered in
`.stepflow/pipeline_run-<paths hash>.json` (one per set of output paths, so that runs writing
elsewhere keep their own parent): under DVC the first stage opens it, later stages nest under it
while it is running, and the final stage (`report`) closes it; the file keeps naming it after, as
the pipeline run that wrote those outputs.

A stage run on its own (`python -m flows <stage>`, a Prefect deployment of one stage, or DVC
rerunning only the report) opens no pipeline run: it nests under the pipeline run whose outputs it
reads, named `<stage> (rerun)`, or, when there is none, is a top-level run named
`<stage> (stand-alone)`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stepflow.config import Params
from stepflow.data.jsonl import atomic_write_json
from stepflow.method import STATE_DIR
from stepflow.provenance import code_version
from stepflow.tracking.experiment import PIPELINE_RUN_NAME, configure

log = logging.getLogger(__name__)

FINAL_STAGE = "report"
# set by `pipeline_run` while a pipeline runs its stages in this process (and its children)
PIPELINE_ENV = "STEPFLOW_PIPELINE_RUN"
# set by DVC for every stage command it runs
DVC_STAGE_ENV = "DVC_STAGE"


def pipeline_state(params: Params) -> Path:
    """Where the pipeline run writing to `params.paths` is remembered."""
    return STATE_DIR / f"pipeline_run-{params.section_hash('paths')}.json"


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


def _recorded_pipeline(state_file: Path, experiment_id: str) -> Any | None:
    """The pipeline run `state_file` names, if it is still in this experiment's store."""
    from mlflow import MlflowClient

    if not state_file.is_file():
        return None
    try:
        run = MlflowClient().get_run(json.loads(state_file.read_text())["run_id"])
    except Exception:  # unreadable, deleted or in another store: as if none
        log.debug("stale pipeline run state %s", state_file, exc_info=True)
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return None
    return run


def _new_pipeline(experiment_id: str, state_file: Path, tags: Mapping[str, str]) -> str:
    from mlflow import MlflowClient

    run = MlflowClient().create_run(
        experiment_id, run_name=PIPELINE_RUN_NAME, tags={"stepflow.kind": "pipeline", **tags}
    )
    atomic_write_json(state_file, {"run_id": run.info.run_id})
    return run.info.run_id


def _open_pipeline(experiment_id: str, state_file: Path, tags: Mapping[str, str]) -> str:
    """The running pipeline run of `state_file` (one that stopped midway is resumed), else a
    new one."""
    recorded = _recorded_pipeline(state_file, experiment_id)
    if recorded is not None and recorded.info.status == "RUNNING":
        return recorded.info.run_id
    return _new_pipeline(experiment_id, state_file, tags)


def stages_run_by_dvc() -> bool:
    """Whether DVC runs this stage as part of `dvc repro` (and no in-process pipeline does)."""
    return bool(os.environ.get(DVC_STAGE_ENV)) and not os.environ.get(PIPELINE_ENV)


def _parent_of_stage(
    stage: str, experiment_id: str, state_file: Path, tags: Mapping[str, str]
) -> tuple[str | None, bool]:
    """(parent run id, whether the stage runs on its own) for a stage run."""
    if run_id := os.environ.get(PIPELINE_ENV):
        return run_id, False
    recorded = _recorded_pipeline(state_file, experiment_id)
    if stages_run_by_dvc():
        if recorded is not None and recorded.info.status == "RUNNING":
            return recorded.info.run_id, False
        if stage != FINAL_STAGE:  # the first stage `dvc repro` runs opens the pipeline run
            return _new_pipeline(experiment_id, state_file, tags), False
    return (recorded.info.run_id if recorded is not None else None), True


@contextmanager
def stage_run(
    params: Params,
    stage: str,
    *,
    tags: Mapping[str, str] | None = None,
    state_file: Path | None = None,
) -> Iterator[Any]:
    """A nested MLflow run for one stage under its pipeline run (see the module docstring)."""
    import mlflow
    from mlflow import MlflowClient

    experiment_id = configure(params.tracking, params.evaluation.splits)
    common = {
        "stepflow.code_version": code_version(),
        "stepflow.params_hash": params.section_hash(),
    }
    common.update(tags or {})
    state_file = state_file or pipeline_state(params)
    parent_id, alone = _parent_of_stage(stage, experiment_id, state_file, common)
    run_name = stage
    run_tags = {"stepflow.stage": stage, "stepflow.kind": "stage", **common}
    if alone:
        run_name = f"{stage} ({'rerun' if parent_id else 'stand-alone'})"
        run_tags["stepflow.standalone"] = "true"
    else:
        MlflowClient().set_tag(parent_id, "stepflow.last_stage", stage)
    with mlflow.start_run(run_name=run_name, parent_run_id=parent_id, tags=run_tags) as run:
        mlflow.log_params(flatten(params.model_dump(mode="json")))
        yield run


@contextmanager
def pipeline_run(params: Params, state_file: Path | None = None) -> Iterator[str]:
    """The parent run of a pipeline that runs its stages in this process: every stage run
    started inside nests under it; it ends FINISHED, or FAILED when the block raises."""
    experiment_id = configure(params.tracking, params.evaluation.splits)
    state_file = state_file or pipeline_state(params)
    tags = {
        "stepflow.code_version": code_version(),
        "stepflow.params_hash": params.section_hash(),
    }
    run_id = _open_pipeline(experiment_id, state_file, tags)
    previous = os.environ.get(PIPELINE_ENV)
    os.environ[PIPELINE_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if previous is None:
            os.environ.pop(PIPELINE_ENV, None)
        else:
            os.environ[PIPELINE_ENV] = previous
        _terminate(run_id, status)


def _terminate(run_id: str, status: str) -> bool:
    from mlflow import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status=status)
    return True


def end_pipeline_run(
    params: Params, status: str = "FINISHED", state_file: Path | None = None
) -> str | None:
    """End the running pipeline run of `params`' outputs, if any; return its id."""
    import mlflow

    state_file = state_file or pipeline_state(params)
    if not state_file.is_file():
        return None
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri)
    run_id = json.loads(state_file.read_text())["run_id"]
    try:
        return run_id if _terminate(run_id, status) else None
    except Exception:  # a run that is gone: nothing to end
        log.debug("pipeline run %s not found", run_id, exc_info=True)
        return None
