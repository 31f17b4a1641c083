"""Prefect tasks: thin wrappers over the stepflow stage functions.

Each task retries only faults that are transient (a simulator that died, an endpoint that
timed out, episodes that failed and can be rerun), records its figures in the active MLflow
run and leaves a table artifact in Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from stepflow import tracking
from stepflow.config import Params
from stepflow.method import GOLDEN_D1, GOLDEN_D2, REFLECTED
from tasks.caching import EvaluationCache
from tasks.retry import transient
from tasks.scaleout import shard_map


def _table(key: str, rows: dict[str, Any], description: str) -> None:
    create_table_artifact(
        key=key,
        table=[{"figure": name, "value": value} for name, value in rows.items()],
        description=description,
    )


@task(
    name="prepare",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def prepare_task(params: Params) -> dict[str, Any]:
    """Manifest + verified golden trajectories D1/D2."""
    from stepflow.data.prepare import prepare

    summary = prepare(params).as_dict()
    data = Path(params.paths.data)
    for name in (GOLDEN_D1, GOLDEN_D2):
        tracking.log_dataset(data / name, Path(name).stem, context="golden")
    tracking.log_metrics(
        {
            "golden_d1": summary["kept"].get("u1", 0),
            "golden_d2": summary["kept"].get("u2", 0),
            "golden_dropped": len(summary["dropped"]),
            "prepare_episodes_per_s": summary["episodes_per_s"],
        }
    )
    _table(
        "prepare",
        {
            "instances": summary["instances"],
            "kept": summary["kept"],
            "dropped": len(summary["dropped"]),
            "seconds": round(summary["seconds"], 1),
        },
        "Golden trajectories prepared",
    )
    return summary


@task(
    name="train",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def train_task(params: Params, variant: str) -> dict[str, Any]:
    """Fine-tune one variant (`stepflow.method.VARIANTS`); log its adapter."""
    from stepflow.train.launch import train
    from stepflow.train.runs import variant_files

    for path in variant_files(params, variant):
        tracking.log_dataset(path, path.stem, context="training")
    result = train(params, variant)  # launched in several processes when configured
    figures = {
        "final_loss": result.final_loss if result.final_loss is not None else float("nan"),
        "global_step": result.global_step,
        "tokens_per_s": result.tokens_per_second,
        "train_seconds": result.train_seconds,
    }
    tracking.log_metrics(figures)
    tracking.log_artifacts(result.output_dir, artifact_path=f"adapter/{variant}")
    _table(
        f"train-{variant.replace('_', '-')}",
        {**figures, **result.stats.as_dict()},
        f"Training of {variant}",
    )
    return {"variant": variant, **figures, "output_dir": str(result.output_dir)}


@task(
    name="synthesize",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def synthesize_task(params: Params) -> dict[str, Any]:
    """Self-reflected trajectories on U2 with the configured teacher (in shards on the
    `scaleout` task runner when configured)."""
    from stepflow.teacher.synthesis import synthesize

    summary = synthesize(params, shard_map=shard_map(params)).as_dict()
    reflected = Path(params.paths.data) / REFLECTED
    tracking.log_dataset(reflected, reflected.stem, "synthesis")
    numeric = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    for group in ("dropped_by", "own_fraction"):
        numeric.update({f"{group}_{k}": v for k, v in summary[group].items()})
    tracking.log_metrics({f"synthesis_{k}": v for k, v in numeric.items()})
    _table("synthesize", numeric, "Self-reflected trajectory synthesis")
    return summary


@task(
    name="evaluate",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient,
    cache_policy=EvaluationCache(),
    persist_result=True,
)
def evaluate_task(params: Params, agent: str) -> dict[str, dict[str, float]]:
    """Evaluate one agent on every configured split; write its metrics files.

    Cached across runs while its outputs are current (same settings, adapter and code): call
    it through `tasks.caching.cached_unless_stale`.
    """
    from stepflow.evaluate.evaluation import evaluate_splits

    results = evaluate_splits(params, agent, shard_map=shard_map(params))
    return {split: metrics.flat() for split, metrics in results.items()}


def mlflow_metric_name(split: str, name: str) -> str:
    """The MLflow name of an evaluation figure: `<split>/<figure>` for the overall figures
    (`test/success`, `test/success_ci_low`, `test/reward`, ...: they sort together) and
    `<split>/task/<task type>/<figure>` for those of one task type (`reward/<task>`)."""
    figure, _, task = name.partition("/")
    return f"{split}/task/{task}/{figure}" if task else f"{split}/{figure}"


def log_evaluation(params: Params, agent: str, figures: dict[str, dict[str, float]]) -> None:
    """Log an agent's evaluation (figures and files) to the active MLflow run."""
    from stepflow.evaluate.evaluation import eval_paths

    for split, flat in figures.items():
        # 4 decimals: the UI shows 0.0583, not 0.058333333333333334
        tracking.log_metrics({mlflow_metric_name(split, k): round(v, 4) for k, v in flat.items()})
        for path in eval_paths(params, agent, split):
            tracking.log_artifact(path, artifact_path=f"evaluation/{agent}")
    overall = {
        split: {k: flat[k] for k in ("reward", "success", "episodes")}
        for split, flat in figures.items()
    }
    _table(
        f"evaluate-{agent.replace('_', '-')}",
        {f"{split} {k}": round(v, 4) for split, row in overall.items() for k, v in row.items()},
        f"Evaluation of {agent}",
    )


@task(name="report", cache_policy=NO_CACHE)
def report_task(params: Params) -> str:
    """The comparison table and plots; also shown in Prefect and MLflow (the results table and
    the plots go on the pipeline's parent run too)."""
    from stepflow.evaluate.report import build_report

    report = build_report(params)
    for path in report.files:
        tracking.log_artifact(path, artifact_path="report")
    tracking.log_results(tracking.active_run_id(), report.table, report.files)
    create_markdown_artifact(
        key="step-results", markdown=report.markdown, description="STeP vs baselines"
    )
    return report.markdown
