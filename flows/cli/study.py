"""`stepflow study run/summary`: the pipeline over `study.seeds` (stepflow.study), resumable,
each seed in a process of its own when `study.parallel` > 1, and the summary over the seeds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import OverrideOption, ParamsOption, flow_overrides, load_or_exit
from stepflow.config import Params
from stepflow.study.seeds import Deadline, seed_dir

app = typer.Typer(
    help="The study: the pipeline over `study.seeds`, resumable, and its summary "
    "(README: Results).",
    no_args_is_help=True,
)


@app.command("run")
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

    seeds = seed or settings.study.seeds
    parsed = flow_overrides(overrides)
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


@app.command("summary")
def study_summary_command(
    params: ParamsOption = Path("params.study.yaml"), overrides: OverrideOption = None
) -> None:
    """Write `study.results` (JSON, table, plot) from the seeds' evaluations so far."""
    load_or_exit(params, overrides)
    from flows.stages import study_summary

    study_summary(str(params), flow_overrides(overrides))


def run_seed_processes(
    params_path: str,
    overrides: list[str],
    seeds: Sequence[int],
    params: Params,
    hours: float | None = None,
) -> dict[int, int]:
    """Run each seed's `stepflow study run --seed N` in a process of its own, up to
    `study.parallel` at once, each logging to `<seed dir>/study.log`; their exit codes.
    No seed starts after `hours`, and each gets what is left of them."""
    # each process's torch gets its share of the cores: oversubscribed threads spin and
    # slow every process down (README: Benchmarks)
    threads = str(max(1, (os.cpu_count() or 1) // params.study.parallel))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
    }
    deadline = Deadline.after_hours(hours)
    pending = list(seeds)
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    codes: dict[int, int] = {}
    try:
        while pending or running:
            while pending and len(running) < params.study.parallel and not deadline.passed:
                seed = pending.pop(0)
                command = [sys.executable, "-m", "flows.cli", "study", "run"]
                command += ["-p", params_path, f"--seed={seed}", "--no-summary"]
                if deadline.at is not None:
                    left = max(0.0, deadline.at - time.monotonic()) / 3600
                    command += [f"--hours={left:.4f}"]
                for override in overrides:
                    command += ["-S", override]
                log = seed_dir(params, seed) / "study.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                handle = log.open("a")
                print(f"seed {seed}: started, log in {log}")
                proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
                running[seed] = (proc, handle)
            if deadline.passed and pending:
                print(f"seeds {pending} not started: the {hours} h are up")
                pending.clear()
            time.sleep(2)
            for seed, (proc, handle) in list(running.items()):
                if proc.poll() is not None:
                    handle.close()
                    codes[seed] = proc.returncode
                    del running[seed]
                    print(f"seed {seed}: exit {proc.returncode}")
    finally:
        for proc, handle in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
    return codes
