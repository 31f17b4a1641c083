"""The `synthesize` stage: self-reflected trajectories on U2.

The base agent (the `init_sft` adapter on the student model) acts on the U2 instances; after
every student step the teacher judges it against the instance's golden trajectory, and a
wrong step is followed by the teacher's executed "Reflection / Thought / Action" turn. Kept
are the trajectories whose final reward reaches `synthesis.keep_threshold`.

Outputs (in `paths.data`): `reflected.jsonl` and `synthesis_stats.json`. Episodes land in a
work log as they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean

from stepflow.config import Params
from stepflow.jsonl import atomic_write_json
from stepflow.llm.served_adapters import adapters_preloaded, with_adapter
from stepflow.locking import holds_outputs
from stepflow.prepare import WORK_ROOT, load_prepared
from stepflow.provenance import adapter_digest
from stepflow.rollout import EPISODE_KEYS
from stepflow.shards import RolloutSpec, ShardMap, run_stage
from stepflow.teacher import TeacherStats
from stepflow.trajectory import Trajectory, read_trajectories, write_trajectories

SYNTHESIS_KEYS = (*EPISODE_KEYS, "teacher", "synthesis")


@dataclass
class SynthesisSummary:
    """What synthesis produced."""

    episodes: int
    kept: int
    dropped: int
    without_reference: int
    corrections_mean: float
    corrections_total: int
    episodes_corrected: int
    teacher: str
    teacher_calls: int
    teacher_fallbacks: int
    teacher_malformed: int
    teacher_prompt_tokens: int
    teacher_completion_tokens: int
    student_prompt_tokens: int
    student_completion_tokens: int
    mean_reward: float
    resumed: int
    seconds: float
    failed: int = 0
    env_restarts: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def keep_rate(self) -> float:
        """Kept / episodes."""
        return self.kept / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "keep_rate": round(self.keep_rate, 4)}


def base_agent_adapter(params: Params) -> Path | None:
    """The init_sft adapter the student runs with (None for an endpoint that already serves
    it under the name `init_sft`)."""
    if adapters_preloaded(params.student):
        return None
    path = Path(params.paths.models) / "init_sft"
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: base agent adapter missing (run the init_sft stage)")
    return path


def kept(trajectories: list[Trajectory], threshold: float) -> list[Trajectory]:
    """Trajectories whose final reward reaches the threshold (and that did not fail)."""
    return [t for t in trajectories if t.reward >= threshold and t.failure is None]


@holds_outputs("synthesize")
def synthesize(
    params: Params,
    *,
    adapter: Path | str | None = "init_sft",
    show_progress: bool = True,
    work_root: Path = WORK_ROOT,
    shard_map: ShardMap | None = None,
) -> SynthesisSummary:
    """Run the synthesis stage; see the module docstring. With a `shard_map`, the episodes
    run in `scaleout.shards` shards (stepflow.shards) and merge into the same work log."""
    started = time.perf_counter()
    data_dir = Path(params.paths.data)
    manifest, _d1, d2 = load_prepared(data_dir)
    references = {t.key: t for t in d2}
    u2 = manifest.select("u2")
    instances = [i for i in u2 if i.key in references]
    adapter_path = base_agent_adapter(params) if adapter == "init_sft" else adapter
    digest = params.section_hash(*SYNTHESIS_KEYS, *params.env.engine_keys())
    if adapter_path is not None:
        digest += "-" + adapter_digest(adapter_path)
    work_log = Path(work_root) / f"synthesize-{digest}" / "episodes.jsonl"

    agent = "init_sft" if adapter == "init_sft" else Path(adapter).name if adapter else "base"
    student, local_adapter = with_adapter(params.student, agent, adapter_path)
    spec = RolloutSpec(
        params=params,
        student=student,
        adapter=Path(local_adapter).resolve() if local_adapter else None,
        source="synthesis",
        params_hash=digest,
        data_dir=data_dir.resolve(),
        review=True,
    )
    run = run_stage(
        spec,
        instances,
        work_log,
        shard_map=shard_map,
        progress=show_progress,
    )
    result = run.summary
    result.raise_for_errors("synthesis")
    result.raise_for_failures("synthesis", params.rollout.max_failed_fraction)
    wanted = {i.key for i in instances}
    episodes = [t for t in read_trajectories(work_log) if t.key in wanted]
    keep = kept(episodes, params.synthesis.keep_threshold)
    write_trajectories(data_dir / "reflected.jsonl", keep)
    corrections = [t.stats.corrections for t in episodes]
    stats = run.teacher_stats or TeacherStats()
    teacher = run.teacher or next(
        (t.provenance.teacher for t in episodes if t.provenance.teacher), params.teacher.kind
    )
    summary = SynthesisSummary(
        episodes=len(episodes),
        kept=len(keep),
        dropped=len(episodes) - len(keep),
        without_reference=len(u2) - len(instances),
        corrections_mean=mean(corrections) if corrections else 0.0,
        corrections_total=sum(corrections),
        episodes_corrected=sum(1 for c in corrections if c),
        teacher=teacher,
        teacher_calls=sum(t.stats.teacher_calls for t in episodes),
        teacher_fallbacks=sum(t.stats.teacher_fallbacks for t in episodes),
        teacher_malformed=stats.malformed,
        teacher_prompt_tokens=stats.prompt_tokens,
        teacher_completion_tokens=stats.completion_tokens,
        student_prompt_tokens=sum(t.stats.prompt_tokens for t in episodes),
        student_completion_tokens=sum(t.stats.completion_tokens for t in episodes),
        mean_reward=mean(t.reward for t in episodes) if episodes else 0.0,
        resumed=result.skipped,
        seconds=time.perf_counter() - started,
        failed=result.failed,
        env_restarts=result.env_restarts,
        failures=result.failures,
        reasons=dict(stats.reasons),
    )
    atomic_write_json(data_dir / "synthesis_stats.json", summary.as_dict())
    return summary
