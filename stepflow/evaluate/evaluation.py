"""The `evaluate` stage: every agent on the same test (and dev) instances, greedy.

Agents (`stepflow.method.AGENTS`): `base` (the untrained student model) and the LoRA adapters
`init_sft`, `golden`, `step`, `step_nomask` on it. Each agent's episodes land in a resumable
work log and are written to `data/eval/<agent>/<split>.jsonl`; metrics go to
`data/eval/<agent>/<split>.metrics.json` (full, with instances) and `metrics/<agent>.json`
(flat figures per split, for `dvc metrics`).
"""

from __future__ import annotations

from pathlib import Path

from stepflow import method
from stepflow.config import LLMConfig, Params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.splits import load_manifest
from stepflow.data.trajectory import read_trajectories, trajectories_of, write_trajectories
from stepflow.evaluate.metrics import AgentMetrics, agent_metrics
from stepflow.llm.served_adapters import adapters_preloaded, with_adapter
from stepflow.locking import holds_outputs
from stepflow.method import EVAL_DIR, EVALUATION_PARAMS, MANIFEST, WORK_ROOT
from stepflow.provenance import adapter_digest
from stepflow.rollout.job import RolloutJob
from stepflow.rollout.shards import ShardMap, run_stage


def agent_adapter(params: Params, agent: str) -> Path | None:
    """The adapter directory of an agent (None for `base`)."""
    trained = method.agent(agent).variant
    if trained is None:
        return None
    path = method.variant(trained).output_dir(params.paths.models)
    if not (path / method.ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: adapter of agent {agent!r} missing (train it first)")
    return path


def greedy(student: LLMConfig) -> LLMConfig:
    """The student config for evaluation: greedy decoding."""
    generation = student.generation.model_copy(update={"temperature": 0.0})
    return student.model_copy(update={"generation": generation})


def evaluation_llm(params: Params) -> LLMConfig:
    """The model evaluation runs agents on: `evaluation.llm`, else `student`."""
    return params.evaluation.llm or params.student


def evaluated_adapter(params: Params, agent: str) -> Path | None:
    """The adapter directory evaluation reads (None for `base`, and for an endpoint that
    already serves the agent under its own name)."""
    if adapters_preloaded(evaluation_llm(params)):
        return None
    return agent_adapter(params, agent)


def evaluation_digest(params: Params, agent: str) -> str:
    """Identity of an evaluation: the settings it reads and the agent's adapter content."""
    digest = params.section_hash(*EVALUATION_PARAMS.keys(params))
    adapter = evaluated_adapter(params, agent)
    if adapter is not None:
        digest += "-" + adapter_digest(adapter)
    return digest


def current_evaluation(params: Params, agent: str) -> str | None:
    """The evaluation digest when every output of this agent's evaluation exists and was
    produced by exactly these inputs; None otherwise."""
    try:
        digest = evaluation_digest(params, agent)
    except FileNotFoundError:
        return None
    if not (Path(params.paths.metrics) / f"{agent}.json").is_file():
        return None
    for split in params.evaluation.splits:
        trajectories, metrics = eval_paths(params, agent, split)
        if not (trajectories.is_file() and metrics.is_file()):
            return None
        if any(t.provenance.params_hash != digest for t in read_trajectories(trajectories)):
            return None
    return digest


def eval_paths(params: Params, agent: str, split: str) -> tuple[Path, Path]:
    """(trajectories, full metrics) files of an agent's evaluation on a split."""
    base = Path(params.paths.data) / EVAL_DIR / agent
    return base / f"{split}.jsonl", base / f"{split}.metrics.json"


@holds_outputs("evaluate")
def evaluate_agent(
    params: Params,
    agent: str,
    split: str = "test",
    *,
    show_progress: bool = True,
    work_root: Path = WORK_ROOT,
    shard_map: ShardMap | None = None,
) -> AgentMetrics:
    """Evaluate one agent on one split; write its trajectories and metrics. With a
    `shard_map`, the episodes run in `scaleout.shards` shards (stepflow.rollout.shards)."""
    data_dir = Path(params.paths.data)
    manifest = load_manifest(data_dir / MANIFEST)
    instances = sorted(manifest.select(split))
    if not instances:
        raise ValueError(f"split {split!r} of {data_dir / MANIFEST} has no instances")
    digest = evaluation_digest(params, agent)
    student, adapter = with_adapter(
        greedy(evaluation_llm(params)), agent, evaluated_adapter(params, agent)
    )
    work_log = Path(work_root) / f"evaluate-{agent}-{split}-{digest}" / "episodes.jsonl"
    job = RolloutJob(
        params=params,
        instances=tuple(instances),
        output=work_log,
        student=student,
        adapter=Path(adapter).resolve() if adapter else None,
        source="evaluation",
        params_hash=digest,
        examples=data_dir.resolve(),
        progress=show_progress,
    )
    result = run_stage(job, shard_map=shard_map)
    what = f"evaluation of {agent} on {split}"
    result.raise_for_errors(what)
    result.raise_for_failures(what, params.rollout.max_failed_fraction)
    trajectories = trajectories_of(work_log, (i.key for i in instances))
    metrics = agent_metrics(
        agent,
        split,
        trajectories,
        samples=params.evaluation.bootstrap_samples,
        confidence=params.evaluation.confidence,
        seed=params.seed,
        protocol=params.evaluation.protocol,
    )
    trajectories_path, metrics_path = eval_paths(params, agent, split)
    write_trajectories(trajectories_path, trajectories)
    atomic_write_json(metrics_path, metrics.model_dump(mode="json"))
    return metrics


def evaluate_splits(
    params: Params, agent: str, *, shard_map: ShardMap | None = None
) -> dict[str, AgentMetrics]:
    """Evaluate one agent on every split of `evaluation.splits`; write its metrics, and its
    flat figures to `metrics/<agent>.json`."""
    results = {
        split: evaluate_agent(params, agent, split, shard_map=shard_map)
        for split in params.evaluation.splits
    }
    write_dvc_metrics(params, agent, results)
    return results


def dvc_metrics_path(params: Params, agent: str) -> Path:
    """`metrics/<agent>.json`, the figures `dvc metrics` shows."""
    return Path(params.paths.metrics) / f"{agent}.json"


def write_dvc_metrics(params: Params, agent: str, results: dict[str, AgentMetrics]) -> Path:
    """`metrics/<agent>.json`: flat figures per split."""
    path = dvc_metrics_path(params, agent)
    atomic_write_json(path, {split: m.flat() for split, m in results.items()})
    return path


def load_agent_metrics(params: Params, agent: str, split: str) -> AgentMetrics | None:
    """The stored metrics of an agent on a split, if it was evaluated."""
    _, path = eval_paths(params, agent, split)
    if not path.is_file():
        return None
    return AgentMetrics.model_validate_json(path.read_text())
