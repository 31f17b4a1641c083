"""Compare two evaluated MLflow runs metric by metric."""

from __future__ import annotations

from dataclasses import dataclass

from stepflow.config import TrackingConfig
from stepflow.tracking import configure, find_run


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
