"""What the commands share: the console, the params options, clean failures, the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from stepflow.config import ConfigError, Params, load_params, parse_overrides

console = Console(stderr=True, soft_wrap=True)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="params file", show_default=True)
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="override a key: -S training.epochs=2 (repeatable)"),
]


def fail(message: str) -> typer.Exit:
    """An exit with code 2 after printing `message` as an error."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def load_or_exit(params: Path, overrides: list[str] | None = None) -> Params:
    """Load params for a command, turning configuration errors into a clean exit."""
    try:
        return load_params(params, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def flow_overrides(overrides: list[str] | None) -> dict[str, Any] | None:
    """`-S key=value` options as the overrides a Prefect flow takes (None for none)."""
    return parse_overrides(overrides) or None


def shard_map(params: Params):
    """Shards on the `scaleout` task runner (Prefect), or None to run in process."""
    if not params.scaleout.fans_out:
        return None
    from tasks.scaleout import shard_map as on_task_runner

    return on_task_runner(params)


def run(app: typer.Typer) -> None:
    """Run a command line; a run refused because another holds its outputs exits with 2."""
    from stepflow.locking import OutputsBusy

    try:
        app()
    except OutputsBusy as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
