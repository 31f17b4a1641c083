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

The experiment is tagged as a model-development experiment and carries a saved runs view,
`Agents`: the evaluation runs with their headline metrics (`test/reward`, `test/success` and
their confidence intervals) as columns, highest average reward first.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from stepflow.config import Params, TrackingConfig
from stepflow.jsonl import atomic_write_json
from stepflow.locking import exclusive
from stepflow.provenance import code_version, file_sha256

log = logging.getLogger(__name__)

PIPELINE_RUN_NAME = "step_pipeline"
FINAL_STAGE = "report"
# set by `pipeline_run` while a pipeline runs its stages in this process (and its children)
PIPELINE_ENV = "STEPFLOW_PIPELINE_RUN"
# set by DVC for every stage command it runs
DVC_STAGE_ENV = "DVC_STAGE"

# MLflow's experiment-kind tag (mlflow/server/js: ExperimentKind); "custom_model_development"
# is the kind the UI calls "Machine learning": a training experiment, whose page is the runs table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
# a saved view of the runs table is an experiment tag with this prefix; the UI lists it under
# "Views" and opens it from `?viewStateShareKey=<key>`
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
AGENTS_VIEW = "agents"
AGENTS_VIEW_NAME = "Agents: reward and success"
# the evaluation metrics every agent is compared on, per split (`test/success`, ...)
HEADLINE_METRICS = (
    "reward",
    "reward_ci_low",
    "reward_ci_high",
    "success",
    "success_ci_low",
    "success_ci_high",
)
RESULTS_TABLE = "results_table.json"
EXPERIMENT_NOTE = f"""STeP agents trained and evaluated by stepflow.

* Compare the agents: **Views → {AGENTS_VIEW_NAME}** (the `evaluate_*` runs with
  `test/reward`, `test/success` and their 95% confidence intervals, highest reward first); select
  runs and press **Compare** to see them side by side.
* Each `{PIPELINE_RUN_NAME}` run is one pipeline run: its stages are nested under it, and it holds
  the results table (`{RESULTS_TABLE}`) and the report's plots (`report/`).
* `<stage> (rerun)`: a stage run on its own, nested under the pipeline run whose outputs it read;
  `<stage> (stand-alone)`: one with no pipeline run to read from.
"""


def pipeline_state(params: Params) -> Path:
    """Where the pipeline run writing to `params.paths` is remembered."""
    return Path(".stepflow") / f"pipeline_run-{params.section_hash('paths')}.json"


def ui_base() -> str:
    """The MLflow UI that links point at (`STEPFLOW_MLFLOW_UI`; default: a local `mlflow ui`)."""
    return os.environ.get("STEPFLOW_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def runs_view_url(
    experiment_id: str, base: str | None = None, view: str | None = AGENTS_VIEW
) -> str:
    """The experiment's runs table in the UI (with a saved view applied when `view` is given).

    `workflowType=machine_learning` selects the UI's "Model training" side: MLflow 3.17 opens an
    experiment on its GenAI overview otherwise, whatever the experiment's kind.
    """
    query = "workflowType=machine_learning"
    if view:
        query += f"&viewStateShareKey={view}"
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs?{query}"


def run_url(experiment_id: str, run_id: str, base: str | None = None) -> str:
    """One run's page in the UI."""
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs/{run_id}"


def agents_view_state(splits: Sequence[str]) -> dict[str, Any]:
    """The runs-table state of the `Agents` view: evaluation runs, headline metrics as columns,
    highest average reward of the first split first (success rates tie at 0 on small runs)."""
    names = [f"{split}/{name}" for split in splits for name in HEADLINE_METRICS]
    columns = [f"metrics.`{name}`" for name in names]
    return {
        "searchFilter": "attributes.run_name LIKE 'evaluate%'",
        "orderByKey": f"metrics.`{splits[0]}/reward`",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,
        # wide enough for the whole metric name (`test/success_ci_high`)
        "columnWidths": {f"metrics.`{name}`": 7 * len(name) + 24 for name in names},
    }


def _view_tag(name: str, state: Mapping[str, Any]) -> str:
    # the saved-view envelope of the MLflow UI: name, creation time (ms), serialized state
    return json.dumps(
        {"name": name, "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
    )


def saved_view_state(tags: Mapping[str, str], key: str) -> dict[str, Any] | None:
    """The runs-table state stored in an experiment's saved view `key`, if any."""
    raw = tags.get(VIEW_TAG_PREFIX + key)
    if raw is None:
        return None
    try:
        return json.loads(json.loads(raw)["state"])
    except (ValueError, KeyError, TypeError):
        return None


def _tag_experiment(experiment_id: str, tags: Mapping[str, str], splits: Sequence[str]) -> None:
    from mlflow import MlflowClient

    wanted: dict[str, str] = {}
    if EXPERIMENT_KIND_TAG not in tags:
        wanted[EXPERIMENT_KIND_TAG] = EXPERIMENT_KIND
    if splits:
        if NOTE_TAG not in tags:
            wanted[NOTE_TAG] = EXPERIMENT_NOTE
        state = agents_view_state(splits)
        if saved_view_state(tags, AGENTS_VIEW) != state:
            wanted[VIEW_TAG_PREFIX + AGENTS_VIEW] = _view_tag(AGENTS_VIEW_NAME, state)
    client = MlflowClient()
    for key, value in wanted.items():
        client.set_experiment_tag(experiment_id, key, value)


def configure(tracking: TrackingConfig, splits: Sequence[str] = ()) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    The experiment is tagged as a model-development experiment; with the evaluation `splits`
    it also gets its description and the `Agents` view of the runs table.
    """
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
                tracking.experiment,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        else:
            experiment_id, tags = experiment.experiment_id, experiment.tags
        _tag_experiment(experiment_id, tags, splits)
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


def log_results(run_id: str, table: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> str:
    """Put a results table (MLflow table artifact) and report files (under `report/`) on the
    pipeline run that run `run_id` belongs to (on `run_id` itself when it has none); return the
    id of the run that got them."""
    from mlflow import MlflowClient

    client = MlflowClient()
    target = client.get_run(run_id).data.tags.get("mlflow.parentRunId", run_id)
    if table:
        import pandas as pd

        columns = list(dict.fromkeys(key for row in table for key in row))
        data = pd.DataFrame({column: [row.get(column) for row in table] for column in columns})
        if RESULTS_TABLE in {a.path for a in client.list_artifacts(target)}:
            # a rerun replaces the table (`log_table` would append its rows to the old ones);
            # the file is what `log_table` writes
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / RESULTS_TABLE
                data.to_json(path, orient="split", index=False, date_format="iso")
                client.log_artifact(target, str(path))
        else:
            client.log_table(target, data=data, artifact_file=RESULTS_TABLE)
    for path in files:
        client.log_artifact(target, str(path), artifact_path="report")
    return target


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
