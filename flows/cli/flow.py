"""`stepflow flow <stage>`: one stage as its Prefect flow run (and nested MLflow run). This is
what each DVC stage runs, as `python -m flows <stage>` (flows/__main__.py), the same app:

python -m flows prepare            python -m flows train step
python -m flows evaluate base      python -m flows pipeline
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from flows.cli.common import OverrideOption, ParamsOption, flow_overrides, load_or_exit, run
from flows.cli.stages import pipeline_command
from stepflow.config import DEFAULT_PARAMS
from stepflow.method import VARIANTS

app = typer.Typer(
    help="Run a stage as its Prefect flow (what dvc.yaml's stages call: python -m flows ...).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _flow_args(params, overrides: list[str] | None) -> tuple[str, dict[str, Any] | None]:
    """The params file and overrides a flow takes, the params validated first."""
    load_or_exit(params, overrides)
    return str(params), flow_overrides(overrides)


@app.command()
def prepare(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Manifest and golden trajectories."""
    from flows.stages import prepare_flow

    prepare_flow(*_flow_args(params, overrides))


@app.command()
def train(
    variant: Annotated[str, typer.Argument(help=" | ".join(VARIANTS))],
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Fine-tune a variant (stepflow/method.py)."""
    from flows.stages import train_flow

    train_flow(variant, *_flow_args(params, overrides))


@app.command()
def synthesize(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Self-reflected trajectories on U2."""
    from flows.stages import synthesize_flow

    synthesize_flow(*_flow_args(params, overrides))


@app.command()
def evaluate(
    agents: Annotated[list[str] | None, typer.Argument(help="agents (default: all)")] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Evaluate agents on the test (and dev) split."""
    from flows.stages import evaluate_flow

    evaluate_flow(agents or None, *_flow_args(params, overrides))


@app.command()
def report(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Comparison report."""
    from flows.stages import report_flow

    typer.echo(report_flow(*_flow_args(params, overrides)))


app.command("pipeline")(pipeline_command)


def main() -> None:
    """`python -m flows`."""
    run(app)
