"""ALFWorld on the real engine (TextWorld PDDL + fast-downward) with self-made games."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepflow.config import AlfworldConfig, ConfigError, EnvConfig, load_params
from stepflow.envs import make_env, observation_only
from stepflow.envs.alfworld import AlfWorldEnv, data_root
from stepflow.envs.base import TaskInstance
from stepflow.trajectory import read_trajectories
from tests.alfworld_games import write_dataset
from tests.conftest import run_tiny_stages

TASK = "pick_and_place_simple"


@pytest.fixture(scope="module")
def alfworld_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("alfworld"))


@pytest.fixture
def env(alfworld_data):
    with AlfWorldEnv(AlfworldConfig(data_dir=alfworld_data)) as env:
        yield env


def instance(variation: int) -> TaskInstance:
    return TaskInstance("alfworld", TASK, variation, "u1")


def test_splits_number_games_once(env) -> None:
    assert env.variations(TASK, "train") == [0, 1, 2, 3]
    assert env.variations(TASK, "dev") == [4]  # valid_seen
    assert env.variations(TASK, "test") == [5, 6]  # valid_unseen
    assert env.variations("pick_heat_then_place_in_recep", "train") == []
    assert "valid_unseen" in str(env.game_file(instance(6)))


@pytest.mark.parametrize("expert", ["handcoded", "planner"])
def test_expert_solves_every_game(alfworld_data, expert) -> None:
    with AlfWorldEnv(AlfworldConfig(data_dir=alfworld_data, expert=expert)) as env:
        for variation in range(7):
            task, room = env.reset(instance(variation))
            assert task.startswith("put ") and "you see a cabinet 1" in room
            gold = env.gold_actions()
            results = [env.step(action) for action in gold]
            assert all(r.valid for r in results)
            assert results[-1].success and results[-1].done and results[-1].reward == 1.0
            assert not any(r.success for r in results[:-1])


def test_wrong_then_right_student(env) -> None:
    task, _ = env.reset(instance(0))
    assert task == "put a apple in countertop"
    assert "go to fridge 1" in env.valid_actions()
    wrong = env.step("go to cabinet 1")
    assert wrong.valid and not wrong.success and "cabinet 1" in wrong.observation
    invalid = env.step("take apple 1 from fridge 1")
    assert not invalid.valid and invalid.observation == "Nothing happens."
    assert not env.step("fly to the moon").valid
    for action in ("go to fridge 1", "open fridge 1", "take apple 1 from fridge 1"):
        assert env.step(action).valid
    assert not env.step("examine apple 1").success
    assert env.step("go to countertop 1").valid
    final = env.step("move apple 1 to countertop 1")
    assert final.success and final.score == 100.0


def test_restore_replays_to_the_same_state(env) -> None:
    actions = ["go to fridge 1", "open fridge 1", "take apple 1 from fridge 1"]
    env.reset(instance(0))
    direct = [env.step(a) for a in actions][-1]
    restored = env.restore(instance(0), actions)
    assert restored.observation == direct.observation
    assert env.step("go to countertop 1").valid
    assert observation_only("alfworld", "examine fridge 1")
    assert not observation_only("alfworld", "open fridge 1")


def test_missing_data_names_the_culprit(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="ALFWORLD_DATA"):
        data_root(AlfworldConfig())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "json_2.1.1")):
        data_root(AlfworldConfig(data_dir=tmp_path))
    with pytest.raises(ValueError, match="no task types"):
        EnvConfig(name="alfworld", task_types=["boil"])


def test_params_select_alfworld(params_file, alfworld_data) -> None:
    params = load_params(
        params_file,
        ["env.name=alfworld", f"env.task_types=[{TASK}]", f"env.alfworld.data_dir={alfworld_data}"],
    )
    with make_env(params.env) as env:
        assert isinstance(env, AlfWorldEnv)
    with pytest.raises(ConfigError, match=r"env\.alfworld\.expert"):
        load_params(params_file, ["env.name=alfworld", "env.alfworld.expert=oracle"])


@pytest.mark.slow
def test_pipeline_stages_on_alfworld(tmp_path, alfworld_data, embedded_dir) -> None:
    outputs = run_tiny_stages(
        tmp_path,
        {
            "env.name": "alfworld",
            "env.task_types": [TASK],
            "env.alfworld": {"data_dir": str(alfworld_data), "expert": "planner"},
            "env.step_limit": 8,
            "splits.train_per_task": 4,
        },
    )
    assert outputs["prepare"].kept == {"u1": 2, "u2": 2}
    golden = list(read_trajectories(tmp_path / "data/golden_d1.jsonl"))
    assert all(t.env == "alfworld" and t.success for t in golden)
    assert "ALFWorld" in golden[0].turns[0].content
    assert outputs["synthesis"].episodes == 2
    assert outputs["metrics"].instances == [
        "alfworld/pick_and_place_simple/5",
        "alfworld/pick_and_place_simple/6",
    ]
