"""The `prepare` stage: manifest, verified golden trajectories D1/D2, one-shot examples.

Outputs (in `paths.data`): `manifest.json`, `golden_d1.jsonl`, `golden_d2.jsonl`,
`examples.json` (one-shot demonstrations per task type, from U1 only) and
`prepare_stats.json` (counts, and golden path lengths per task type before and after
`golden.compress`). Replays are appended to a work log as they finish, so a killed run
resumes where it stopped; final files are written atomically at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from stepflow.agent.prompts import render_example
from stepflow.config import EnvConfig, Params
from stepflow.envs import make_env
from stepflow.envs.base import TaskInstance
from stepflow.data.golden import GoldReplay, ThoughtWriter, golden_thoughts, render_golden, replay_gold
from stepflow.data.jsonl import atomic_write_json, read_records
from stepflow.locking import holds_outputs
from stepflow.method import (
    EXAMPLES,
    GOLDEN_D1,
    GOLDEN_D2,
    MANIFEST,
    PREPARE_PARAMS,
    PREPARE_STATS,
    WORK_ROOT,
)
from stepflow.progress import progress_bar
from stepflow.data.splits import Manifest, build_manifest, load_manifest, write_manifest
from stepflow.data.trajectory import Provenance, Trajectory, TrajectoryLog, write_trajectories

log = logging.getLogger(__name__)

EXAMPLE_CANDIDATES = 3


@dataclass
class PrepareSummary:
    """What the prepare stage produced."""

    instances: dict[str, int]
    kept: dict[str, int]
    dropped: list[str] = field(default_factory=list)
    path_lengths: dict[str, dict[str, float | int]] = field(default_factory=dict)
    compression_fallbacks: int = 0
    replayed: int = 0
    resumed: int = 0
    workers: int = 1
    seconds: float = 0.0

    @property
    def episodes_per_s(self) -> float:
        """Replays per second of wall time (this run only)."""
        return self.replayed / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "episodes_per_s": round(self.episodes_per_s, 3)}


def prepare_hash(params: Params) -> str:
    """Hash of every setting the prepare outputs depend on (`stepflow.method.PREPARE_PARAMS`)."""
    return params.section_hash(*PREPARE_PARAMS.keys(params))


# -- replays: a fresh simulator per instance -----------------------------------------------
# ScienceWorld's worlds are deterministic per variation, but its gold-path generator picks
# among equivalent targets depending on what the JVM loaded before. A fresh JVM per replay
# makes the golden data the same whatever the worker count or order.
def replay_fresh(
    env_config: EnvConfig | dict, instance: TaskInstance, compress: bool = False
) -> GoldReplay:
    """Replay one instance's gold sequence (compressed when asked) in a newly started
    environment."""
    config = EnvConfig.model_validate(env_config)
    with make_env(config) as env:
        return replay_gold(env, instance, compress=compress)


def replay_all(
    instances: list[TaskInstance], env_config: EnvConfig, workers: int, compress: bool = False
) -> Iterator[GoldReplay]:
    """Replay gold sequences, in `workers` processes when > 1, yielding in input order."""
    if not instances:
        return
    if workers <= 1:
        for instance in instances:
            yield replay_fresh(env_config, instance, compress)
        return
    config = env_config.model_dump(mode="json")
    count = len(instances)
    with ProcessPoolExecutor(
        max_workers=min(workers, count), mp_context=get_context("spawn")
    ) as pool:
        yield from pool.map(replay_fresh, [config] * count, instances, [compress] * count)


def path_lengths(trajectories: list[Trajectory]) -> dict[str, dict[str, float | int]]:
    """Per task type, golden path lengths (steps) of successful replays before (`raw_*`)
    and after compression, and how many were compressed / fell back to the original; with
    several experts (ALFWorld), how many paths each gave (`expert_<name>`)."""
    by_task: dict[str, list[Trajectory]] = {}
    replayed: Counter = Counter()
    for trajectory in trajectories:
        replayed[trajectory.task_type] += 1
        if trajectory.success:
            by_task.setdefault(trajectory.task_type, []).append(trajectory)
    table: dict[str, dict[str, float | int]] = {}
    for task in sorted(replayed):
        group = by_task.get(task, [])
        if not group:
            table[task] = {"replayed": replayed[task], "paths": 0}
            continue
        steps = [t.num_steps for t in group]
        raw = [int(t.provenance.extra.get("raw_steps", t.num_steps)) for t in group]
        outcome = Counter(t.provenance.extra.get("compression", "off") for t in group)
        experts = Counter(
            t.provenance.extra["expert"] for t in group if "expert" in t.provenance.extra
        )
        table[task] = {
            "replayed": replayed[task],
            "paths": len(group),
            "raw_mean": round(sum(raw) / len(raw), 2),
            "raw_max": max(raw),
            "mean": round(sum(steps) / len(steps), 2),
            "max": max(steps),
            "compressed": outcome["compressed"],
            "fallbacks": outcome["fallback"],
            **{f"expert_{name}": n for name, n in sorted(experts.items())},
        }
    return table


# -- one-shot examples -------------------------------------------------------------------
def choose_examples(
    candidates: list[GoldReplay],
    render: Callable[[GoldReplay, str | None], Trajectory],
) -> dict[str, list[dict[str, str]]]:
    """Per task type, the two shortest successful U1 replays rendered as demonstrations."""
    examples: dict[str, list[dict[str, str]]] = {}
    by_task: dict[str, list[GoldReplay]] = {}
    for replay in candidates:
        if replay.success:
            by_task.setdefault(replay.instance.task_type, []).append(replay)
    for task, replays in by_task.items():
        replays.sort(key=lambda r: (len(r.actions), r.instance.variation))
        examples[task] = [
            {"key": r.instance.key, "text": render_example(render(r, None))} for r in replays[:2]
        ]
    return examples


def example_for(examples: dict[str, list[dict[str, str]]], instance: TaskInstance) -> str | None:
    """The demonstration for an instance: same task type, never the instance itself."""
    for candidate in examples.get(instance.task_type, []):
        if candidate["key"] != instance.key:
            return candidate["text"]
    return None


def load_examples(data_dir: Path) -> dict[str, list[dict[str, str]]]:
    """The one-shot examples written by prepare ({} when there are none)."""
    path = Path(data_dir) / EXAMPLES
    return json.loads(path.read_text()) if path.is_file() else {}


# -- the stage ---------------------------------------------------------------------------
@holds_outputs("prepare")
def prepare(
    params: Params,
    *,
    workers: int | None = None,
    thought_writer: ThoughtWriter | None = None,
    show_progress: bool = True,
    work_root: Path = WORK_ROOT,
) -> PrepareSummary:
    """Run the prepare stage; see the module docstring for its outputs.

    With `golden.thoughts: teacher` the thoughts come from the teacher LLM (`teacher.llm`)
    unless a `thought_writer` is given.
    """
    if params.golden.thoughts == "teacher" and thought_writer is None:
        from stepflow.llm import make_backend
        from stepflow.teacher.thoughts import LLMThoughtWriter

        assert params.teacher.llm is not None  # guaranteed by Params validation
        writer = LLMThoughtWriter.from_params(params, make_backend(params.teacher.llm))
        try:
            return prepare(
                params,
                workers=workers,
                thought_writer=writer,
                show_progress=show_progress,
                work_root=work_root,
            )
        finally:
            writer.close()
    started = time.perf_counter()
    workers = workers or params.env.workers
    data_dir = Path(params.paths.data)
    digest = prepare_hash(params)
    provenance = Provenance(source="golden", params_hash=digest)
    mode = params.golden.thoughts
    max_chars = params.agent.max_observation_chars

    with make_env(params.env) as env:
        manifest = build_manifest(env, params)
        training = manifest.select("u1", "u2")
        u1_by_task: dict[str, list[TaskInstance]] = {}
        for instance in manifest.select("u1"):
            u1_by_task.setdefault(instance.task_type, []).append(instance)
    compress = params.compresses_golden
    candidates = (
        list(
            replay_all(
                [i for group in u1_by_task.values() for i in group[:EXAMPLE_CANDIDATES]],
                params.env,
                workers,
                compress,
            )
        )
        if params.agent.one_shot
        else []
    )

    def render(replay: GoldReplay, example: str | None) -> Trajectory:
        thoughts = golden_thoughts(replay, mode, thought_writer)
        return render_golden(replay, thoughts, example, provenance, max_chars)

    examples = choose_examples(candidates, render) if params.agent.one_shot else {}

    work_dir = Path(work_root) / f"prepare-{digest}"
    replayed = 0
    with TrajectoryLog(work_dir / "golden.jsonl") as work_log:
        todo = [i for i in training if i.key not in work_log.done]
        resumed = len(training) - len(todo)
        with progress_bar("golden replays", total=len(training), enabled=show_progress) as bar:
            bar.advance(resumed)
            for replay in replay_all(todo, params.env, workers, compress):
                work_log.append(render(replay, example_for(examples, replay.instance)))
                replayed += 1
                bar.advance(1)
        replays = dict(work_log.done)

    summary = _write_outputs(data_dir, manifest, replays, examples)
    summary.replayed, summary.resumed, summary.workers = replayed, resumed, workers
    summary.seconds = time.perf_counter() - started
    atomic_write_json(data_dir / PREPARE_STATS, summary.as_dict())
    return summary


def _write_outputs(
    data_dir: Path,
    manifest: Manifest,
    replays: dict[str, Trajectory],
    examples: dict[str, list[dict[str, str]]],
) -> PrepareSummary:
    kept: Counter = Counter()
    dropped: list[str] = []
    by_split: dict[str, list[Trajectory]] = {"u1": [], "u2": []}
    for instance in manifest.select("u1", "u2"):
        trajectory = replays[instance.key]
        if trajectory.success:
            by_split[instance.split].append(trajectory)
            kept[instance.split] += 1
        else:
            dropped.append(
                f"{instance.key} (score {trajectory.score:g} after {trajectory.num_steps} steps)"
            )
    for key in dropped:
        log.warning("gold replay did not reach score 100 (within its step cap), dropped: %s", key)
    write_manifest(data_dir / MANIFEST, manifest)
    write_trajectories(data_dir / GOLDEN_D1, by_split["u1"])
    write_trajectories(data_dir / GOLDEN_D2, by_split["u2"])
    atomic_write_json(data_dir / EXAMPLES, examples)
    counts = Counter(entry.split for entry in manifest.instances)
    lengths = path_lengths([replays[i.key] for i in manifest.select("u1", "u2")])
    return PrepareSummary(
        instances=dict(counts),
        kept=dict(kept),
        dropped=dropped,
        path_lengths=lengths,
        compression_fallbacks=sum(int(row["fallbacks"]) for row in lengths.values()),
    )


def load_prepared(data_dir: Path) -> tuple[Manifest, list[Trajectory], list[Trajectory]]:
    """Manifest, D1 and D2 of a prepared data directory."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir / MANIFEST)
    d1 = list(read_records(data_dir / GOLDEN_D1, Trajectory))
    d2 = list(read_records(data_dir / GOLDEN_D2, Trajectory))
    return manifest, d1, d2
