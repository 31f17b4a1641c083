"""Golden paths shortened with teleportation (`golden.compress`), verified by replay in the
real ScienceWorld simulator; the original path is kept when the shorter one fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepflow.config import load_params
from stepflow.data.golden import compress_gold, replay_gold, template_thought
from stepflow.data.prepare import load_prepared, prepare
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv

ENV = "scienceworld"
NAVIGATION = ("open door to ", "go to ")


@pytest.fixture(scope="module")
def env():
    with ScienceWorldEnv() as simulator:
        yield simulator


def test_navigation_runs_become_teleports_and_no_ops_go() -> None:
    actions = [
        "open door to kitchen",
        "go to kitchen",
        "open door to outside",
        "go to outside",
        "look around",
        "open cupboard",
        "open cupboard",
        "focus on blue jay",
        "open door to kitchen",
        "go to kitchen",
        "open door to hallway",
        "move blue jay to red box",
    ]
    observations = [
        "The door is already open.",
        "You move to the kitchen.",
        "The door is already open.",
        "You move to the outside.",
        "This outside location is called the outside.",
        "The cupboard is now open.",
        "The cupboard is already open.",
        "You focus on the blue jay.",
        "The door is already open.",
        "You move to the kitchen.",
        "The door is now open.",
        "You move the blue jay to the red box.",
    ]
    assert compress_gold(actions, observations) == [
        "teleport to outside",
        "look around",
        "open cupboard",
        "focus on blue jay",
        "teleport to kitchen",
        "open door to hallway",  # a door the run really opened after its last move stays
        "move blue jay to red box",
    ]
    assert template_thought("teleport to outside") == "Next I go to the outside."


@pytest.mark.parametrize(
    "task, variation", [("find-non-living-thing", 1), ("lifespan-longest-lived", 1)]
)
def test_compressed_gold_paths_reach_full_score(env, task, variation) -> None:
    instance = TaskInstance(ENV, task, variation, "u1")
    original = replay_gold(env, instance)
    assert original.success and any(a.startswith(NAVIGATION) for a in original.actions)
    replay = replay_gold(env, instance, compress=True)
    assert replay.compression == "compressed" and replay.success
    assert replay.raw_steps == len(original.actions) > len(replay.actions)
    assert replay.actions[0].startswith("teleport to ")
    assert not any(a.startswith(NAVIGATION) for a in replay.actions)
    assert not any("already open" in o for o in replay.observations)
    env.reset(instance)  # the kept path replays to full score on its own
    results = [env.step(action) for action in replay.actions]
    assert results[-1].success and results[-1].score == 100


def test_compression_falls_back_when_the_shorter_path_fails(env) -> None:
    # the plants grow with every action: skipping the walk leaves the apple tree too young
    # to be focused at its adult stage when the gold path gets there
    instance = TaskInstance(ENV, "identify-life-stages-2", 0, "u1")
    original = replay_gold(env, instance)
    shorter = compress_gold(original.actions, original.observations)
    assert original.success and len(shorter) < len(original.actions)
    replay = replay_gold(env, instance, compress=True)
    assert replay.compression == "fallback" and replay.success
    # the gold path kept as it is (the simulator may route it through another room)
    assert replay.raw_steps == len(replay.actions)
    assert any(a.startswith(NAVIGATION) for a in replay.actions)
    assert not any(a.startswith("teleport to ") for a in replay.actions)


@pytest.mark.slow
def test_prepare_reports_path_lengths_before_and_after(tmp_path, params_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [
        "env.task_types=[lifespan-longest-lived]",
        "splits.train_per_task=2",
        "splits.test_per_task=1",
        "env.workers=1",
        "golden.compress=true",
    ]
    summary = prepare(load_params(params_file, overrides), show_progress=False)
    _, d1, d2 = load_prepared(Path("data"))
    assert summary.kept == {"u1": 1, "u2": 1} and summary.compression_fallbacks == 0
    for trajectory in d1 + d2:
        assert trajectory.provenance.extra["compression"] == "compressed"
        raw = int(trajectory.provenance.extra["raw_steps"])
        assert trajectory.num_steps < raw
        assert trajectory.assistant_turns()[0].action.startswith("teleport to ")
    stats = json.loads(Path("data/prepare_stats.json").read_text())
    lengths = stats["path_lengths"]["lifespan-longest-lived"]
    steps = [t.num_steps for t in d1 + d2]
    assert lengths["paths"] == 2 and lengths["compressed"] == 2 and lengths["fallbacks"] == 0
    assert lengths["mean"] == sum(steps) / 2 and lengths["max"] == max(steps)
    assert lengths["raw_mean"] > lengths["mean"] and lengths["raw_max"] > lengths["max"]
