"""What stages record in MLflow: metrics, datasets, artifacts, the results table; and how
runs are found again. Every MLflow call of stepflow's stages goes through this package.
"""

from __future__ import annotations

import math
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stepflow.provenance import file_sha256
from stepflow.tracking.experiment import RESULTS_TABLE


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


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Put a file on the active run (under `artifact_path`)."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(directory: str | Path, artifact_path: str | None = None) -> None:
    """Put a directory's files on the active run (under `artifact_path`)."""
    import mlflow

    mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


def active_run_id() -> str:
    """The id of the active run."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run")
    return run.info.run_id


def log_to_active_run(metrics: Mapping[str, Any], step: int, prefix: str) -> None:
    """Log the numeric values of `metrics` to the caller's active MLflow run, if any.

    The caller owns run structure: nothing is logged when no run is active. mlflow is not
    imported here: no run can be active in a process that never imported it (a training
    process started by a launcher).
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return
    numeric = {
        f"{prefix}{key}": float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def find_run(ref: str):
    """A run by id, or by name (the newest run of that name)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"attributes.run_name = '{ref}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        raise LookupError(f"no MLflow run with id or name {ref!r}")
    return runs[0]
