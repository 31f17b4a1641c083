"""The `stepflow` command line: every command of the project, above the flows and the library.

One module per group: `stages` (the stages run in process: prepare, train, rollout,
synthesize, evaluate, report, compare, pipeline), `flow` (a stage as its Prefect flow run:
what dvc.yaml calls, as `python -m flows <stage>`), `data` (export/import, show-mask),
`config` (config check, model pull-embedded), `study`, `serve`. Library logic stays in the
library (stepflow/): commands parse options, call it and print.
"""

from __future__ import annotations

import typer

from flows.cli import config, data, flow, serve, stages, study
from flows.cli.common import run

app = typer.Typer(
    help="stepflow: train LLM agents with STeP (self-reflected trajectories + partial masking).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(config.config_app, name="config")
app.add_typer(config.model_app, name="model")
app.add_typer(stages.app)
app.add_typer(data.app, name="data")
app.add_typer(data.commands)
app.add_typer(study.app, name="study")
app.add_typer(serve.app, name="serve")
app.add_typer(flow.app, name="flow")


def main() -> None:
    """The `stepflow` entry point."""
    run(app)
