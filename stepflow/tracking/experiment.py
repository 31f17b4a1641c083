"""The MLflow experiment: where runs go, how it is tagged, and links into its UI.

The experiment is tagged as a model-development experiment and carries a saved runs view,
`Agents`: the evaluation runs with their headline metrics (`test/reward`, `test/success` and
their confidence intervals) as columns, highest average reward first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from stepflow.config import TrackingConfig
from stepflow.locking import exclusive

PIPELINE_RUN_NAME = "step_pipeline"
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
