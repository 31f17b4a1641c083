"""One Prefect flow per stage, and the whole pipeline.

Every flow takes the params file and optional overrides (`{"training.epochs": 2}`), so a
deployment run can change any key of params.yaml; each opens a nested MLflow run (under the
pipeline's parent run, or marked as a run of its own: `stepflow.tracking`) tagged with the
Prefect flow-run id and leaves a link to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from stepflow import method, tracking
from stepflow.config import Params, load_params
from stepflow.evaluate.evaluation import current_evaluation
from stepflow.method import BASE_AGENT, TRAIN_VARIANTS
from stepflow.study import seeds as study_seeds
from stepflow.study import summary as study_results
from tasks.caching import cached_unless_stale
from tasks.stages import (
    evaluate_task,
    log_evaluation,
    prepare_task,
    report_task,
    synthesize_task,
    train_task,
)

Overrides = dict[str, Any] | None


def load(params_path: str, overrides: Overrides) -> Params:
    """The validated params of a flow run."""
    return load_params(params_path, overrides)


def _prefect_tags() -> dict[str, str]:
    run_id = flow_run.get_id()
    if run_id is None:
        return {}
    return {"prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(flow_run.get_name())}


@contextmanager
def tracked(params: Params, stage: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow stage run, linked from the Prefect flow run."""
    with tracking.stage_run(params, stage, tags={**_prefect_tags(), **(tags or {})}) as run:
        if flow_run.get_id() is not None:
            create_link_artifact(
                key=f"mlflow-{stage.replace('_', '-')}",
                link=tracking.run_url(run.info.experiment_id, run.info.run_id),
                link_text=f"MLflow run of {stage}",
            )
        yield run


@flow(name="prepare", log_prints=True)
def prepare_flow(params_path: str = "params.yaml", overrides: Overrides = None) -> dict:
    """Manifest and verified golden trajectories (D1, D2)."""
    params = load(params_path, overrides)
    with tracked(params, "prepare"):
        return prepare_task(params)


@flow(name="train", log_prints=True)
def train_flow(variant: str, params_path: str = "params.yaml", overrides: Overrides = None) -> dict:
    """Fine-tune one variant (`stepflow.method.VARIANTS`)."""
    params = load(params_path, overrides)
    with tracked(params, method.variant(variant).stage):
        return train_task(params, variant)


@flow(name="synthesize", log_prints=True)
def synthesize_flow(params_path: str = "params.yaml", overrides: Overrides = None) -> dict:
    """Self-reflected trajectories on U2 (student: the base agent; teacher from params)."""
    params = load(params_path, overrides)
    with tracked(params, "synthesize"):
        return synthesize_task(params)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    agents: list[str] | None = None, params_path: str = "params.yaml", overrides: Overrides = None
) -> dict:
    """Evaluate agents (default: evaluation.agents) on the configured splits."""
    params = load(params_path, overrides)
    results = {}
    for agent in agents or params.evaluation.agents:
        method.agent(agent)  # an unknown name fails before any run starts
        with tracked(params, f"evaluate_{agent}", tags={"stepflow.agent": agent}):
            task = cached_unless_stale(evaluate_task, current_evaluation(params, agent) is not None)
            results[agent] = task(params, agent)
            log_evaluation(params, agent, results[agent])
    return results


@flow(name="report", log_prints=True)
def report_flow(
    params_path: str = "params.yaml", overrides: Overrides = None, end_pipeline: bool = True
) -> str:
    """The comparison report; under `dvc repro` it closes the pipeline's parent MLflow run."""
    params = load(params_path, overrides)
    with tracked(params, "report") as run:
        markdown = report_task(params)
    if end_pipeline and tracking.stages_run_by_dvc():
        tracking.end_pipeline_run(params)
    view = tracking.runs_view_url(run.info.experiment_id)
    print(f"MLflow, the agents side by side: {view}")
    if flow_run.get_id() is not None:
        create_link_artifact(key="mlflow-agents", link=view, link_text="MLflow: agents compared")
    return markdown


@flow(name="step_pipeline", log_prints=True)
def step_pipeline(params_path: str = "params.yaml", overrides: Overrides = None) -> str:
    """The whole method: prepare → init_sft → synthesize → train golden/step/step_nomask →
    evaluate → report; one MLflow parent run holds the stage runs."""
    with tracking.pipeline_run(load(params_path, overrides)):
        prepare_flow(params_path, overrides)
        train_flow(BASE_AGENT, params_path, overrides)
        synthesize_flow(params_path, overrides)
        for variant in TRAIN_VARIANTS:
            train_flow(variant, params_path, overrides)
        evaluate_flow(None, params_path, overrides)
        return report_flow(params_path, overrides)


def _study_stages(params_path: str, overrides: dict[str, Any], run: Params) -> list[tuple]:
    """(name, done?, do) of one seed's stages, in pipeline order."""
    from stepflow.teacher.synthesis import synthesis_current

    stages: list[tuple] = [
        (
            "prepare",
            lambda: study_seeds.prepared(run),
            lambda: prepare_flow(params_path, overrides),
        ),
        (
            method.variant(BASE_AGENT).stage,
            lambda: study_seeds.trained(run, BASE_AGENT),
            lambda: train_flow(BASE_AGENT, params_path, overrides),
        ),
        (
            "synthesize",
            lambda: synthesis_current(run),
            lambda: synthesize_flow(params_path, overrides),
        ),
    ]
    for variant in TRAIN_VARIANTS:
        stages.append(
            (
                method.variant(variant).stage,
                lambda v=variant: study_seeds.trained(run, v),
                lambda v=variant: train_flow(v, params_path, overrides),
            )
        )
    for agent in run.evaluation.agents:
        stages.append(
            (
                f"evaluate_{agent}",
                lambda a=agent: current_evaluation(run, a) is not None,
                lambda a=agent: evaluate_flow([a], params_path, overrides),
            )
        )
    stages.append(
        (
            "report",
            lambda: study_seeds.reported(run),
            lambda: report_flow(params_path, overrides, end_pipeline=False),
        )
    )
    return stages


@flow(name="study", log_prints=True)
def study_flow(
    params_path: str = "params.study.yaml",
    overrides: Overrides = None,
    seeds: list[int] | None = None,
    hours: float | None = None,
    summary: bool = True,
) -> dict | None:
    """The study (stepflow.study): every seed's pipeline, skipping stages already done and
    starting none after `hours`; then the summary over the seeds with results."""
    params = load(params_path, overrides)
    deadline = study_seeds.Deadline.after_hours(hours)
    for seed in seeds if seeds is not None else params.study.seeds:
        seed_overrides = {**(overrides or {}), **study_seeds.seed_overrides(params, seed)}
        run = load(params_path, seed_overrides)
        timings = study_seeds.Timings(study_seeds.seed_dir(params, seed) / study_seeds.TIMINGS)
        stages = _study_stages(params_path, seed_overrides, run)
        if all(done() for _name, done, _do in stages):
            print(f"seed {seed}: every stage is done")
            continue
        with tracking.pipeline_run(run):
            for name, done, do in stages:
                if done():  # asked just before: an upstream rerun makes this stage stale
                    continue
                if deadline.passed:
                    break
                print(f"seed {seed}: {name}")
                with timings.running(name):
                    do()
        if deadline.passed:
            print(f"stopped after {hours} h; run the same command again to go on")
            break
    return study_summary(params_path, overrides) if summary else None


def study_summary(params_path: str = "params.study.yaml", overrides: Overrides = None) -> dict:
    """Write the study's summary over every seed of `study.seeds` that has results."""
    params = load(params_path, overrides)
    runs = {
        seed: load(params_path, {**(overrides or {}), **study_seeds.seed_overrides(params, seed)})
        for seed in params.study.seeds
    }
    summary = study_results.write_summary(params, runs)
    print(study_results.markdown(summary))
    return summary
