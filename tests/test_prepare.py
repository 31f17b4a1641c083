"""The prepare stage on the real simulator: outputs, examples, resumption after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from stepflow.config import ConfigError, load_params
from stepflow.data.prepare import load_examples, load_prepared, prepare, prepare_hash
from stepflow.data.trajectory import read_trajectories
from stepflow.envs.scienceworld import ScienceWorldEnv

TASKS = "[find-non-living-thing, lifespan-longest-lived]"


def _overrides(train: int = 4) -> list[str]:
    return [
        f"env.task_types={TASKS}",
        f"splits.train_per_task={train}",
        "splits.test_per_task=2",
        "env.workers=1",
    ]


def test_prepare_writes_verified_golden_sets(tmp_path, params_file, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = load_params(params_file, [*_overrides(), "agent.one_shot=true"])
    summary = prepare(params, show_progress=False)
    manifest, d1, d2 = load_prepared(Path("data"))
    assert summary.kept == {"u1": len(d1), "u2": len(d2)}
    assert summary.dropped == []
    assert {t.key for t in d1} == {i.key for i in manifest.select("u1")}
    assert {t.key for t in d2} == {i.key for i in manifest.select("u2")}
    for trajectory in d1 + d2:
        assert trajectory.success and trajectory.reward == 1.0
        steps = trajectory.assistant_turns()
        assert steps and all(t.kind == "step" and t.loss for t in steps)
        assert all(t.content.startswith("Thought: ") for t in steps)
        assert trajectory.provenance.params_hash == prepare_hash(params)
    examples = load_examples(Path("data"))
    u1_keys = {i.key for i in manifest.select("u1")}
    test_keys = {i.key for i in manifest.select("test")}
    for candidates in examples.values():
        for candidate in candidates:
            assert candidate["key"] in u1_keys and candidate["key"] not in test_keys
    for trajectory in d1:  # a trajectory never carries itself as its demonstration
        own = {c["key"]: c["text"] for c in examples[trajectory.task_type]}.get(trajectory.key)
        if own is not None:
            assert own not in trajectory.turns[1].content
        assert "Here is an example" in trajectory.turns[1].content
    stats = json.loads(Path("data/prepare_stats.json").read_text())
    assert stats["replayed"] == len(manifest.select("u1", "u2"))


def _half_gold_path(actions: list[str]) -> list[str]:
    """The first half of a gold path (a path cut short on purpose)."""
    return actions[: len(actions) // 2]


def _bare_replay_score(task: str, variation: int) -> tuple[float, int]:
    """The score the bare simulator (no stepflow code) ends on after the first half of an
    instance's gold path, in a fresh JVM as prepare replays it, and that half's length."""
    from scienceworld import ScienceWorldEnv as Simulator

    simulator = Simulator("", envStepLimit=1000)
    try:
        simulator.load(task, variation, "easy", generateGoldPath=True)
        simulator.reset()
        gold = simulator.get_gold_action_sequence()
        half = _half_gold_path(gold)
        for action in half:
            _, _, done, info = simulator.step(action)
            assert not done, action
        return float(info["score"]), len(half)
    finally:
        simulator.close()


@pytest.mark.slow
def test_replays_short_of_full_score_are_dropped_and_reported(
    tmp_path, params_file, monkeypatch, caplog
) -> None:
    """Golden paths are kept only at score 100: a gold path cut to its first half on purpose
    (the U2 instance's) is dropped and listed with its score in prepare_stats.json and the log; a
    compressed path that misses 100 (life stages: the plants grow with every action) falls
    back to the original path, counted in prepare_stats.json."""
    monkeypatch.chdir(tmp_path)
    task = "identify-life-stages-2"
    overrides = [
        f"env.task_types=[{task}]",
        "splits.train_per_task=2",
        "splits.test_per_task=1",
        "env.workers=1",
        "agent.one_shot=false",
        "golden.compress=true",
    ]
    params = load_params(params_file, overrides)
    gold_actions = ScienceWorldEnv.gold_actions

    def u2_cut_short(self: ScienceWorldEnv) -> list[str]:
        actions = gold_actions(self)
        return _half_gold_path(actions) if self._instance.split == "u2" else actions

    monkeypatch.setattr(ScienceWorldEnv, "gold_actions", u2_cut_short)
    with caplog.at_level("WARNING", logger="stepflow.data.prepare"):
        summary = prepare(params, show_progress=False)

    manifest, d1, d2 = load_prepared(Path("data"))
    [u1], [u2] = manifest.select("u1"), manifest.select("u2")
    # seed 0 draws variations 0 (U1) and 3 (U2); variation 0's compressed path falls back
    assert (u1.variation, u2.variation) == (0, 3), "the seeded draw changed: pick new ones"
    score, steps = _bare_replay_score(task, u2.variation)
    assert 0 <= score < 100
    assert d2 == [] and [t.key for t in d1] == [u1.key]
    stats = json.loads(Path("data/prepare_stats.json").read_text())
    assert stats == summary.as_dict() | {"seconds": stats["seconds"]}
    assert stats["kept"] == {"u1": 1}
    dropped = f"{u2.key} (score {score:g} after {steps} steps)"
    assert stats["dropped"] == [dropped]
    assert f"did not reach score 100 (within its step cap), dropped: {dropped}" in caplog.text
    [kept] = d1
    assert kept.success and kept.provenance.extra["compression"] == "fallback"
    assert int(kept.provenance.extra["raw_steps"]) == kept.num_steps
    assert not any(t.action.startswith("teleport to ") for t in kept.assistant_turns())
    assert stats["compression_fallbacks"] == 1
    lengths = stats["path_lengths"][task]
    assert (lengths["paths"], lengths["compressed"], lengths["fallbacks"]) == (1, 0, 1)
    assert lengths["raw_max"] == lengths["max"] == kept.num_steps


def test_thought_modes(tmp_path, params_file, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = load_params(
        params_file, [*_overrides(), "golden.thoughts=none", "agent.one_shot=false"]
    )
    prepare(params, show_progress=False)
    _, d1, _ = load_prepared(Path("data"))
    assert all(t.content.startswith("Action: ") for t in d1[0].assistant_turns())
    assert "Here is an example" not in d1[0].turns[1].content


@pytest.mark.slow
def test_killed_prepare_resumes_without_duplicates(tmp_path, params_file) -> None:
    params_path = tmp_path / "params.yaml"
    params_path.write_text(params_file.read_text())
    args = [sys.executable, "-m", "flows.cli", "prepare", "-p", str(params_path)]
    for override in _overrides(train=12):
        args += ["-S", override]
    params = load_params(params_path, _overrides(train=12))
    work_log = tmp_path / ".stepflow" / "work" / f"prepare-{prepare_hash(params)}" / "golden.jsonl"
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if work_log.exists() and work_log.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (tmp_path / "data" / "golden_d1.jsonl").exists()  # no half-written output
    landed = [t.key for t in read_trajectories(work_log)]
    assert 3 <= len(landed) < 24

    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads((tmp_path / "data" / "prepare_stats.json").read_text())
    assert stats["resumed"] == len(landed)
    assert stats["replayed"] == 24 - len(landed)
    keys = [t.key for t in read_trajectories(work_log)]
    assert len(keys) == 24 and len(set(keys)) == 24
    d1 = list(read_trajectories(tmp_path / "data" / "golden_d1.jsonl"))
    d2 = list(read_trajectories(tmp_path / "data" / "golden_d2.jsonl"))
    counts = Counter(t.key for t in d1 + d2)
    assert len(counts) == 24 and max(counts.values()) == 1


def test_parallel_workers_give_the_same_data(tmp_path, params_file, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = load_params(params_file, _overrides())
    prepare(params, workers=1, show_progress=False, work_root=tmp_path / "w1")
    one = Path("data/golden_d1.jsonl").read_text()
    prepare(params, workers=2, show_progress=False, work_root=tmp_path / "w2")
    two = Path("data/golden_d1.jsonl").read_text()

    def strip_times(text: str) -> list:
        records = [json.loads(line) for line in text.splitlines()]
        for record in records:
            record["provenance"].pop("created_at")
        return records

    assert strip_times(one) == strip_times(two)


@pytest.mark.slow
def test_teacher_written_thoughts(tmp_path, params_file, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [
        "env.task_types=[find-non-living-thing]",
        "splits.train_per_task=2",
        "splits.test_per_task=1",
        "agent.one_shot=false",
        "golden.thoughts=teacher",
        "teacher.llm={backend: local, model: embedded, generation: {max_new_tokens: 24}}",
    ]
    params = load_params(params_file, overrides)
    prepare(params, show_progress=False)
    _, d1, d2 = load_prepared(Path("data"))
    for trajectory in d1 + d2:
        steps = trajectory.assistant_turns()
        assert steps and all(t.content.startswith("Thought: ") for t in steps)
        thoughts = [t.content.split("\n")[0] for t in steps]
        assert all(len(t) > len("Thought: ") for t in thoughts)
    missing = [o for o in overrides if not o.startswith("teacher.llm")]
    with pytest.raises(ConfigError, match=r"needs a teacher\.llm section"):
        load_params(params_file, missing)
