"""Screenshot of the MLflow runs view that compares the agents (the README's picture).

Starts `mlflow server` on the store, opens the experiment's `Agents` view in headless Chromium
and writes a PNG; fails when the page shows no evaluation runs. Retake it after `make run`:

    python docs/screenshot_runs.py         # sqlite:///mlruns/mlflow.db -> docs/mlflow-runs.png
    python docs/screenshot_runs.py --store sqlite:////abs/mlflow.db --out /tmp/runs.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepflow import tracking  # noqa: E402
from stepflow.tracking import ui as mlflow_ui  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlruns/mlflow.db", help="MLflow store URI")
    parser.add_argument("--experiment", default="stepflow", help="experiment name")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow-runs.png")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=720)
    args = parser.parse_args(argv)

    import mlflow

    client = mlflow.MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        parser.error(f"no experiment {args.experiment!r} in {args.store}")
    with mlflow_ui.mlflow_server(args.store) as base:
        url = tracking.runs_view_url(experiment.experiment_id, base)
        text = mlflow_ui.page_text(url)
        mlflow_ui.check_runs_page(text, ["evaluate_"], ["test/success", "test/reward"])
        mlflow_ui.screenshot(url, args.out, args.width, args.height)
    print(f"{args.out} ({mlflow_ui.runs_shown(text)} runs shown) from {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
