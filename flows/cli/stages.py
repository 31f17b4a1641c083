"""The method's stages run in this process (`stepflow prepare`, `train`, `synthesize`,
`evaluate`, `report`), a rollout of the student on chosen instances, the comparison of two
MLflow runs, and the whole pipeline as one Prefect flow run. Each calls the same library
functions the flows and tasks do (stepflow.data.prepare, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.cli.common import (
    OverrideOption,
    ParamsOption,
    console,
    fail,
    flow_overrides,
    load_or_exit,
    shard_map,
)
from stepflow.config import DEFAULT_PARAMS
from stepflow.method import AGENT_NAMES, VARIANTS

app = typer.Typer()


@app.command("prepare")
def prepare_command(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
    workers: Annotated[
        int | None, typer.Option(help="environment worker processes (default: env.workers)")
    ] = None,
) -> None:
    """Build the manifest and the verified golden trajectories D1/D2 (the prepare stage)."""
    from stepflow.data.jsonl import DataError
    from stepflow.data.prepare import prepare

    loaded = load_or_exit(params, overrides)
    try:
        summary = prepare(loaded, workers=workers)
    except (DataError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(
        f"[green]prepared[/] {summary.instances} instances; kept {summary.kept}; "
        f"dropped {len(summary.dropped)}; {summary.replayed} replayed "
        f"({summary.resumed} resumed) in {summary.seconds:.1f}s "
        f"= {summary.episodes_per_s:.2f} episodes/s with {summary.workers} worker(s)"
    )


@app.command("train")
def train_command(
    variant: Annotated[str, typer.Argument(help=" | ".join(VARIANTS))],
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
    out_dir: Annotated[
        Path | None, typer.Option(help="adapter directory (default: <paths.models>/<variant>)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="continue from the last checkpoint")
    ] = True,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="data-parallel processes, launched by training.distributed.launcher "
            "(default: training.distributed.nproc)",
        ),
    ] = None,
) -> None:
    """Fine-tune the student on one variant's data and save its adapter."""
    from stepflow.data.jsonl import DataError
    from stepflow.train.launch import train

    extra = [f"training.distributed.nproc={nproc}"] if nproc else []
    loaded = load_or_exit(params, [*(overrides or []), *extra])
    try:
        result = train(loaded, variant, out_dir=out_dir, resume=resume)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    stats = result.stats
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    console.print(
        f"[green]trained[/] {variant}: {result.global_step} steps, final loss {loss}, "
        f"{stats.kept}/{stats.examples} trajectories ({stats.dropped} dropped, "
        f"{stats.truncated} truncated), {stats.trained_tokens}/{stats.total_tokens} tokens "
        f"trained, {result.tokens_per_second:.0f} tokens/s"
        + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
    )
    typer.echo(str(result.output_dir))


@app.command(
    "rollout",
    help="Run the student of params.yaml on task instances; each finished episode is "
    "appended to OUTPUT at once, and a rerun skips the instances already there.\n\n"
    "Instances: --split test takes the manifest's test instances (prepare stage); "
    "--task TYPE --variations 1,2,5-7 names them (labelled with their manifest split, "
    "else --split, else the environment's official split).\n\n"
    "Step limits, generation length and one-shot prompting come from params.yaml; "
    "override with -S env.step_limit=5 -S student.generation.max_new_tokens=48. "
    "Prints a JSON summary (episodes, mean reward, success rate, parse failures, "
    "invalid actions, tokens, wall time).",
)
def rollout_command(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="trajectory JSONL (appended; rerun resumes)")
    ],
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="the manifest's instances of this split (u1, u2, test, dev, train); with "
            "--variations: the label of instances the manifest does not list"
        ),
    ] = None,
    task: Annotated[str | None, typer.Option(help="task type (with --variations)")] = None,
    variations: Annotated[
        str | None, typer.Option(help="variations of --task, e.g. 1,2,5-7")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most N instances")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="split manifest (default: <paths.data>/manifest.json)")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter directory for the local student")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="episodes at once (default: rollout.concurrency)")
    ] = None,
    max_episodes: Annotated[
        int | None, typer.Option(min=1, help="stop after N new episodes (rerun to continue)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Run the student of params.yaml on task instances, appending episodes to a JSONL."""
    import json

    from stepflow.data.jsonl import DataError
    from stepflow.data.prepare import load_examples
    from stepflow.data.selection import SelectionError, choose_instances
    from stepflow.rollout.job import RolloutJob

    loaded = load_or_exit(params, overrides)
    try:
        instances = choose_instances(
            loaded,
            manifest=manifest,
            split=split,
            task=task,
            variations=variations,
            limit=limit,
        )
    except (SelectionError, DataError) as exc:
        raise fail(str(exc)) from None
    data = Path(loaded.paths.data)
    one_shot = loaded.agent.one_shot
    if one_shot and not load_examples(data):
        console.print(
            "[yellow]warning:[/] agent.one_shot is set but there are no one-shot "
            "examples (run prepare); running zero-shot"
        )
    summary = RolloutJob(
        loaded,
        tuple(instances),
        output,
        adapter=adapter,
        examples=data if one_shot else None,
        concurrency=concurrency,
        max_episodes=max_episodes,
        progress=progress,
    ).run()
    typer.echo(json.dumps(summary.to_dict(), indent=2))
    if summary.errors:
        raise fail(f"{len(summary.errors)} episode(s) failed; rerun to retry them")


@app.command("synthesize")
def synthesize_command(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Run the base agent on U2 with the teacher: writes data/reflected.jsonl (the synthesize
    stage). A rerun resumes from the episodes already finished."""
    import json

    from stepflow.data.jsonl import DataError
    from stepflow.rollout.engine import EpisodeErrors
    from stepflow.teacher.synthesis import synthesize

    loaded = load_or_exit(params, overrides)
    try:
        summary = synthesize(loaded, shard_map=shard_map(loaded))
    except (DataError, FileNotFoundError, ValueError, EpisodeErrors) as exc:
        raise fail(str(exc)) from None
    console.print(
        f"[green]synthesized[/] kept {summary.kept}/{summary.episodes} trajectories, "
        f"{summary.corrections_mean:.2f} corrections per episode, teacher calls "
        f"{summary.teacher_calls}, fallbacks {summary.teacher_fallbacks}, "
        f"{summary.seconds:.0f}s"
    )
    typer.echo(json.dumps(summary.as_dict(), indent=2))


@app.command("evaluate")
def evaluate_command(
    agents: Annotated[
        list[str] | None,
        typer.Argument(help=f"{' | '.join(AGENT_NAMES)} (default: evaluation.agents)"),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Evaluate agents on the configured splits, greedy, the same instances for all; writes
    data/eval/ and metrics/<agent>.json."""
    from stepflow.data.jsonl import DataError
    from stepflow.evaluate.evaluation import dvc_metrics_path, evaluate_splits
    from stepflow.rollout.engine import EpisodeErrors

    loaded = load_or_exit(params, overrides)
    shards = shard_map(loaded)
    for agent in agents or loaded.evaluation.agents:
        try:
            results = evaluate_splits(loaded, agent, shard_map=shards)
        except (DataError, FileNotFoundError, ValueError, EpisodeErrors) as exc:
            raise fail(str(exc)) from None
        path = dvc_metrics_path(loaded, agent)
        for split, metrics in results.items():
            o = metrics.overall
            console.print(
                f"[green]{agent}[/] {split}: reward {o.reward.mean:.3f} "
                f"[{o.reward.low:.2f}, {o.reward.high:.2f}], success {o.success.mean:.3f} "
                f"({o.episodes} episodes) → {path}"
            )


@app.command("report")
def report_command(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Write reports/results.md, reports/per_task.csv and the plots from stored evaluations."""
    from stepflow.evaluate.report import build_report

    loaded = load_or_exit(params, overrides)
    try:
        report = build_report(loaded)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    typer.echo(report.markdown)


@app.command("compare")
def compare_command(
    run_a: Annotated[str, typer.Argument(help="MLflow run id or name")],
    run_b: Annotated[str, typer.Argument(help="MLflow run id or name")],
    prefix: Annotated[
        str | None, typer.Option(help="only metrics starting with this, e.g. test/")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Print the metrics of two MLflow runs side by side with their difference (B - A)."""
    from rich.table import Table

    from stepflow.evaluate.compare import compare_runs

    loaded = load_or_exit(params)
    try:
        id_a, id_b, diffs = compare_runs(run_a, run_b, loaded.tracking, prefix)
    except LookupError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"A = {id_a}   B = {id_b}")
    for column in ("metric", "A", "B", "B - A"):
        table.add_column(column, justify="left" if column == "metric" else "right")

    def show(value: float | None, signed: bool = False) -> str:
        if value is None:
            return "—"
        return f"{value:+.4g}" if signed else f"{value:.4g}"

    for diff in diffs:
        table.add_row(diff.name, show(diff.a), show(diff.b), show(diff.delta, signed=True))
    Console(width=200).print(table)


@app.command("pipeline")
def pipeline_command(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Run the whole pipeline as one Prefect flow run (without DVC's stage caching)."""
    load_or_exit(params, overrides)
    from flows.stages import step_pipeline

    typer.echo(step_pipeline(str(params), flow_overrides(overrides)))
