"""Trajectory data: `stepflow data export/import` (the conversation format of other
agent-tuning projects) and `stepflow show-mask` (one trajectory as training sees it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import OverrideOption, ParamsOption, console, fail, load_or_exit
from stepflow.config import DEFAULT_PARAMS

app = typer.Typer(
    help="Trajectory datasets: conversion to and from other formats.", no_args_is_help=True
)

commands = typer.Typer()


@app.command("export")
def data_export(
    source: Annotated[list[Path], typer.Argument(help="stepflow trajectory JSONL file(s)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="conversation-format JSONL to write")],
) -> None:
    """Export trajectories to the conversation format ({"from","value","loss"} turns)."""
    from stepflow.data.convert import export_conversations
    from stepflow.data.jsonl import DataError
    from stepflow.data.trajectory import load_trajectories

    try:
        count = export_conversations(load_trajectories(*source), out)
    except DataError as exc:
        raise fail(str(exc)) from None
    console.print(f"[green]exported[/] {count} trajectories to {out}")


@app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="conversation-format JSONL or JSON list")],
    out: Annotated[Path, typer.Option("--out", "-o", help="stepflow trajectory JSONL to write")],
    env: Annotated[str, typer.Option(help="environment of records without metadata")] = "imported",
    split: Annotated[str, typer.Option(help="split of records without metadata")] = "u1",
) -> None:
    """Import conversation-format records (from other agent-tuning projects) as trajectories."""
    from stepflow.data.convert import import_conversations
    from stepflow.data.jsonl import DataError
    from stepflow.data.trajectory import write_trajectories

    try:
        trajectories = list(import_conversations(source, {"env": env, "split": split}))
    except DataError as exc:
        raise fail(str(exc)) from None
    count = write_trajectories(out, trajectories)
    console.print(f"[green]imported[/] {count} trajectories to {out}")


@commands.command("show-mask")
def show_mask_command(
    path: Annotated[Path, typer.Argument(help="trajectory JSONL file")],
    index: Annotated[
        int | None, typer.Option("--index", "-i", help="record number (0-based)")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="task instance: env/task_type/variation")
    ] = None,
    nomask: Annotated[
        bool, typer.Option("--nomask", help="the step_nomask view: erroneous steps trained")
    ] = False,
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Print one trajectory as the student's tokenizer sees it, trained tokens highlighted."""
    from rich.console import Console

    from stepflow.data.jsonl import DataError
    from stepflow.data.trajectory import read_trajectories
    from stepflow.train.examples import training_view
    from stepflow.train.masking import TemplateError
    from stepflow.train.maskview import (
        cut_at,
        legend,
        mask_counts,
        pick_trajectory,
        render_mask,
        view_notes,
    )
    from stepflow.train.modeling import load_tokenizer

    if index is not None and key is not None:
        raise fail("give --index or --key, not both")
    loaded = load_or_exit(params, overrides)
    try:
        chosen = pick_trajectory(list(read_trajectories(path)), str(path), index=index, key=key)
    except (DataError, LookupError) as exc:
        raise fail(str(exc)) from None
    tokenizer = load_tokenizer(loaded.student.model)
    cfg = loaded.training
    try:
        seen = training_view(
            chosen,
            tokenizer,
            mask_erroneous=not nomask,
            max_seq_len=cfg.max_seq_len,
            truncation=cfg.truncation,
        )
    except TemplateError as exc:
        raise fail(str(exc)) from None
    out = Console(highlight=False)
    view = "step_nomask (erroneous steps trained)" if nomask else "partial masking"
    out.rule(f"{chosen.key} — {view} — {loaded.student.model}")
    out.print(render_mask(seen.tokenized, tokenizer, cut_at=cut_at(seen)))
    out.rule()
    out.print(legend(mask_counts(seen.tokenized)))
    for note in view_notes(seen, f"max_seq_len {cfg.max_seq_len}, truncation {cfg.truncation}"):
        out.print(note)
