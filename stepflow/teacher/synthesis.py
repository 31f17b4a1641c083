"""The `synthesize` stage: self-reflected trajectories on U2.

The base agent (the `init_sft` adapter on the student model) acts on the U2 instances; after
every student step the teacher judges it against the instance's golden trajectory, and a
wrong step is followed by the teacher's executed "Reflection / Thought / Action" turn. Every
student step is judged; an episode with a step that could not be corrected stops there.
Kept are the trajectories that were not stopped, whose final reward reaches
`synthesis.keep_threshold` and whose share of the student's own accepted steps reaches
`synthesis.min_own_steps`; the others are counted by reason.

Outputs (in `paths.data`): `reflected.jsonl` and `synthesis_stats.json`. Episodes land in a
work log as they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, quantiles

from stepflow.config import Params, TeacherConfig
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.prepare import load_prepared
from stepflow.data.trajectory import (
    Trajectory,
    read_trajectories,
    trajectories_of,
    write_trajectories,
)
from stepflow.llm.served_adapters import adapters_preloaded, with_adapter
from stepflow.locking import holds_outputs
from stepflow.method import (
    ADAPTER_CONFIG,
    BASE_AGENT,
    REFLECTED,
    SYNTHESIS_PARAMS,
    SYNTHESIS_STATS,
    UNTRAINED,
    WORK_ROOT,
    variant,
)
from stepflow.provenance import adapter_digest
from stepflow.rollout.job import RolloutJob
from stepflow.rollout.shards import ShardMap, run_stage
from stepflow.teacher import TeacherStats, make_teacher
from stepflow.teacher.reviewer import RewindPolicy, TeacherReviewer


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
    dropped_by: dict[str, int] = field(default_factory=dict)
    accepted_turns: int = 0
    erroneous_turns: int = 0
    reflection_turns: int = 0
    teacher_steps: int = 0
    truncated_turns: int = 0
    fitted_prompts: int = 0
    accepted_share: float = 0.0
    reflection_token_share: float | None = None
    own_fraction: dict[str, float] = field(default_factory=dict)

    @property
    def keep_rate(self) -> float:
        """Kept / episodes."""
        return self.kept / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "keep_rate": round(self.keep_rate, 4)}


@dataclass(frozen=True)
class TeacherReview:
    """The teacher of params.yaml reviewing every student step against the instance's golden
    trajectory (D2 of the prepared `data_dir`); started by each process that runs episodes."""

    teacher: TeacherConfig
    rewind: RewindPolicy
    data_dir: Path

    def start(self) -> TeacherReviewer:
        """The teacher, its backend opened, as the rollout's step reviewer."""
        _, _, d2 = load_prepared(self.data_dir)
        teacher = make_teacher(self.teacher)
        return TeacherReviewer(teacher, {t.key: t for t in d2}, self.rewind)


def base_agent_adapter(params: Params) -> Path | None:
    """The init_sft adapter the student runs with (None for an endpoint that already serves
    it under the name `init_sft`)."""
    if adapters_preloaded(params.student):
        return None
    path = variant(BASE_AGENT).output_dir(params.paths.models)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: base agent adapter missing (run the init_sft stage)")
    return path


def drop_reason(trajectory: Trajectory, threshold: float, min_own_steps: float = 0.0) -> str | None:
    """Why a synthesized trajectory is not kept (None: it is kept)."""
    if trajectory.failure is not None:
        return "failed"
    if trajectory.stop_reason is not None:
        return trajectory.stop_reason
    if trajectory.reward < threshold:
        return "below_threshold"
    if trajectory.own_fraction < min_own_steps:
        return "few_own_steps"
    return None


def kept(
    trajectories: list[Trajectory], threshold: float, min_own_steps: float = 0.0
) -> list[Trajectory]:
    """Trajectories that were not stopped or failed, reach the reward threshold and hold at
    least `min_own_steps` of the student's own accepted steps."""
    return [t for t in trajectories if drop_reason(t, threshold, min_own_steps) is None]


def own_fraction_summary(trajectories: list[Trajectory]) -> dict[str, float]:
    """Distribution of the own-step share over trajectories (min, quartiles, max, mean)."""
    values = sorted(t.own_fraction for t in trajectories)
    if not values:
        return {}
    quartiles = quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {
        "min": round(values[0], 4),
        "p25": round(quartiles[0], 4),
        "median": round(quartiles[1], 4),
        "p75": round(quartiles[2], 4),
        "max": round(values[-1], 4),
        "mean": round(mean(values), 4),
    }


def reflection_token_share(trajectories: list[Trajectory], params: Params) -> float | None:
    """Share of the trained tokens (partial masking) that lie in reflection turns."""
    if not trajectories:
        return None
    from stepflow.llm.embedded import resolve_model
    from stepflow.train.examples import build_examples
    from stepflow.train.modeling import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(params.student.model))
    _, stats = build_examples(
        trajectories,
        tokenizer,
        mask_erroneous=True,
        max_seq_len=params.training.max_seq_len,
        truncation=params.training.truncation,
    )
    trained = sum(stats.per_kind_trained_tokens.values())
    return stats.per_kind_trained_tokens.get("reflection", 0) / trained if trained else None


def _count_kind(trajectories: list[Trajectory], kind: str) -> int:
    return sum(1 for t in trajectories for turn in t.turns if turn.kind == kind)


def synthesis_digest(params: Params, adapter: Path | str | None) -> str:
    """Identity of a synthesis run: the settings it reads and the student's adapter content."""
    digest = params.section_hash(*SYNTHESIS_PARAMS.keys(params))
    if adapter is not None:
        digest += "-" + adapter_digest(adapter)
    return digest


def synthesis_current(params: Params) -> bool:
    """Whether `reflected.jsonl` and its stats exist and every kept trajectory came from a
    synthesis with exactly these settings and this init_sft adapter (none kept: False)."""
    data_dir = Path(params.paths.data)
    reflected, stats = data_dir / REFLECTED, data_dir / SYNTHESIS_STATS
    if not (reflected.is_file() and stats.is_file()):
        return False
    try:
        digest = synthesis_digest(params, base_agent_adapter(params))
    except FileNotFoundError:
        return False
    hashes = {t.provenance.params_hash for t in read_trajectories(reflected)}
    return hashes == {digest}


@holds_outputs("synthesize")
def synthesize(
    params: Params,
    *,
    adapter: Path | str | None = BASE_AGENT,
    show_progress: bool = True,
    work_root: Path = WORK_ROOT,
    shard_map: ShardMap | None = None,
) -> SynthesisSummary:
    """Run the synthesis stage; see the module docstring. With a `shard_map`, the episodes
    run in `scaleout.shards` shards (stepflow.rollout.shards) and merge into the same work log."""
    started = time.perf_counter()
    data_dir = Path(params.paths.data)
    manifest, _d1, d2 = load_prepared(data_dir)
    references = {t.key: t for t in d2}
    u2 = manifest.select("u2")
    instances = [i for i in u2 if i.key in references]
    adapter_path = base_agent_adapter(params) if adapter == BASE_AGENT else adapter
    digest = synthesis_digest(params, adapter_path)
    work_log = Path(work_root) / f"synthesize-{digest}" / "episodes.jsonl"

    agent = BASE_AGENT if adapter == BASE_AGENT else Path(adapter).name if adapter else UNTRAINED
    student, local_adapter = with_adapter(params.student, agent, adapter_path)
    job = RolloutJob(
        params=params,
        instances=tuple(instances),
        output=work_log,
        student=student,
        adapter=Path(local_adapter).resolve() if local_adapter else None,
        source="synthesis",
        params_hash=digest,
        examples=data_dir.resolve(),
        review=TeacherReview(params.teacher, params.synthesis.rewind, data_dir.resolve()),
        progress=show_progress,
    )
    result = run_stage(job, shard_map=shard_map)
    result.raise_for_errors("synthesis")
    result.raise_for_failures("synthesis", params.rollout.max_failed_fraction)
    # in instance order: training reads the file in order, so the same seed trains the same
    # adapters however the episodes were timed
    episodes = trajectories_of(work_log, (i.key for i in instances))
    threshold, min_own = params.synthesis.keep_threshold, params.synthesis.min_own_steps
    keep = kept(episodes, threshold, min_own)
    write_trajectories(data_dir / REFLECTED, keep)
    dropped_by = Counter(
        reason for t in episodes if (reason := drop_reason(t, threshold, min_own)) is not None
    )
    accepted_turns = sum(t.stats.accepted_steps for t in keep)
    assistant_turns = sum(t.num_steps for t in keep)
    corrections = [t.stats.corrections for t in episodes]
    stats = result.teacher_stats or TeacherStats()
    teacher = result.teacher or next(
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
        dropped_by=dict(sorted(dropped_by.items())),
        accepted_turns=accepted_turns,
        erroneous_turns=_count_kind(keep, "erroneous_step"),
        reflection_turns=_count_kind(keep, "reflection"),
        teacher_steps=sum(t.stats.rewinds for t in keep),
        truncated_turns=sum(t.stats.truncated for t in episodes),
        fitted_prompts=sum(t.stats.fitted_prompts for t in episodes),
        accepted_share=round(accepted_turns / assistant_turns, 4) if assistant_turns else 0.0,
        reflection_token_share=reflection_token_share(keep, params),
        own_fraction=own_fraction_summary(keep),
    )
    atomic_write_json(data_dir / SYNTHESIS_STATS, summary.as_dict())
    return summary
