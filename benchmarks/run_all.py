"""Run every benchmark and log its results to MLflow (experiment `stepflow-benchmarks`).

    python -m benchmarks.run_all [--only prepare,rollout,matmul,training,serving,scaleout]
    python -m benchmarks.run_all --only profile,agent_backends --log-only

Each benchmark runs in its own process and writes benchmarks/results/<name>.json; this
script then records each file as an MLflow run: numeric figures as metrics, the file as an
artifact. The benchmarks that need a trained study seed (`profile`, `agent_backends`) or
ALFWorld's games (`alfworld`) are not in the default list: run them on their own (see each
script's docstring), then log their results with `--log-only`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stepflow.config import load_params
from stepflow.tracking import configure, log_metrics

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("prepare", "rollout", "matmul", "training", "serving", "scaleout")


def numeric(data: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a nested result, as `a/b/c: value`."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric(value, f"{name}/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float):
            out[name] = float(value)
    return out


def main() -> None:
    """Run the benchmarks, then log them."""
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument(
        "--log-only", action="store_true", help="log the existing results files, run nothing"
    )
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name]
    scripts = {name: ROOT / "benchmarks" / f"bench_{name}.py" for name in chosen}
    results = {name: ROOT / "benchmarks" / "results" / f"{name}.json" for name in chosen}
    for name in chosen:
        if not scripts[name].is_file():
            sys.exit(f"--only {name}: no benchmark {scripts[name].relative_to(ROOT)}")
        if args.log_only and not results[name].is_file():
            sys.exit(
                f"--log-only: {results[name].relative_to(ROOT)} does not exist; "
                f"run {scripts[name].name}"
            )
    for name in chosen if not args.log_only else []:
        subprocess.run([sys.executable, str(scripts[name])], cwd=ROOT, check=True)
    tracking = load_params(ROOT / "params.yaml").tracking
    configure(tracking.model_copy(update={"experiment": "stepflow-benchmarks"}))
    for name in chosen:
        path = results[name]
        result = json.loads(path.read_text())
        with mlflow.start_run(run_name=f"bench_{name}"):
            mlflow.set_tag("stepflow.kind", "benchmark")
            log_metrics(numeric(result))
            mlflow.log_artifact(str(path))
        print(f"logged {path.name} to MLflow")


if __name__ == "__main__":
    main()
