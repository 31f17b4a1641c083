"""Run flows from the command line (this is what DVC stages call).

python -m flows prepare            python -m flows train step
python -m flows evaluate base      python -m flows pipeline
"""

from __future__ import annotations

from typing import Annotated

import typer

from stepflow.method import VARIANTS

app = typer.Typer(
    help="Run stepflow's Prefect flows.", no_args_is_help=True, pretty_exceptions_enable=False
)

Params = Annotated[str, typer.Option("--params", "-p", help="params file")]
Set = Annotated[list[str] | None, typer.Option("--set", "-S", help="override: key.path=value")]


def _overrides(values: list[str] | None) -> dict | None:
    from stepflow.config import parse_overrides

    return parse_overrides(values) or None


@app.command()
def prepare(params: Params = "params.yaml", overrides: Set = None) -> None:
    """Manifest and golden trajectories."""
    from flows.stages import prepare_flow

    prepare_flow(params, _overrides(overrides))


@app.command()
def train(
    variant: Annotated[str, typer.Argument(help=" | ".join(VARIANTS))],
    params: Params = "params.yaml",
    overrides: Set = None,
) -> None:
    """Fine-tune a variant (stepflow/method.py)."""
    from flows.stages import train_flow

    train_flow(variant, params, _overrides(overrides))


@app.command()
def synthesize(params: Params = "params.yaml", overrides: Set = None) -> None:
    """Self-reflected trajectories on U2."""
    from flows.stages import synthesize_flow

    synthesize_flow(params, _overrides(overrides))


@app.command()
def evaluate(
    agents: Annotated[list[str] | None, typer.Argument(help="agents (default: all)")] = None,
    params: Params = "params.yaml",
    overrides: Set = None,
) -> None:
    """Evaluate agents on the test (and dev) split."""
    from flows.stages import evaluate_flow

    evaluate_flow(agents or None, params, _overrides(overrides))


@app.command()
def report(params: Params = "params.yaml", overrides: Set = None) -> None:
    """Comparison report."""
    from flows.stages import report_flow

    print(report_flow(params, _overrides(overrides)))


@app.command()
def pipeline(params: Params = "params.yaml", overrides: Set = None) -> None:
    """The whole pipeline in one flow run."""
    from flows.stages import step_pipeline

    print(step_pipeline(params, _overrides(overrides)))


if __name__ == "__main__":
    app()
