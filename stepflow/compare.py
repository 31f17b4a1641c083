"""Compare two evaluated MLflow runs metric by metric."""

from __future__ import annotations

from dataclasses import dataclass

from stepflow.config import TrackingConfig
from stepflow.tracking import configure


@dataclass
class MetricDiff:
    """One metric in two runs."""

    name: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        """b - a when both exist."""
        return None if self.a is None or self.b is None else self.b - self.a


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


def compare_runs(
    run_a: str, run_b: str, tracking: TrackingConfig, prefix: str | None = None
) -> tuple[str, str, list[MetricDiff]]:
    """The metrics of two runs side by side (optionally only names starting with `prefix`)."""
    configure(tracking)
    a, b = find_run(run_a), find_run(run_b)
    names = sorted(set(a.data.metrics) | set(b.data.metrics))
    if prefix:
        names = [n for n in names if n.startswith(prefix)]
    diffs = [MetricDiff(n, a.data.metrics.get(n), b.data.metrics.get(n)) for n in names]
    return a.info.run_id, b.info.run_id, diffs
