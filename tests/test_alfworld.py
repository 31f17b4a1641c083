"""ALFWorld on the real engine (TextWorld PDDL + fast-downward): the real 2.1.1 games from
the shared archive, and self-made games (alfworld 0.4's `move X to Y` grammar) for the
adapter's fast checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from stepflow.config import ALFWORLD_TASK_TYPES, AlfworldConfig, ConfigError, EnvConfig, load_params
from stepflow.data.convert import from_conversation, to_conversation
from stepflow.data.golden import replay_gold
from stepflow.data.splits import build_manifest
from stepflow.data.trajectory import read_trajectories
from stepflow.envs import make_env, observation_only
from stepflow.envs.alfworld import AlfWorldEnv, data_root, game_id, resolve_command
from stepflow.envs.base import TaskInstance
from stepflow.evaluate.protocols import eto_alfworld_games, evaluation_step_limit
from tests.alfworld_games import SHARED_DATA, real_games, write_dataset
from tests.conftest import run_tiny_stages

TASK = "pick_and_place_simple"
# the self-made dataset in variation order: valid_seen, valid_unseen, then train
DEV, TEST, TRAIN = [0], [1, 2], [3, 4, 5, 6]


@pytest.fixture(scope="module")
def alfworld_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("alfworld"))


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> Path:
    """The real valid_train / valid_seen / valid_unseen games, extracted once."""
    return real_games(tmp_path_factory.mktemp("alfworld-real"))


@pytest.fixture
def env(alfworld_data):
    with AlfWorldEnv(AlfworldConfig(data_dir=alfworld_data)) as env:
        yield env


def instance(variation: int, task: str = TASK) -> TaskInstance:
    return TaskInstance("alfworld", task, variation, "u1")


# -- self-made games ---------------------------------------------------------------------
def test_splits_number_games_once(env) -> None:
    assert env.variations(TASK, "dev") == DEV  # valid_seen
    assert env.variations(TASK, "test") == TEST  # valid_unseen
    assert env.variations(TASK, "train") == TRAIN
    assert env.variations("pick_heat_then_place_in_recep", "train") == []
    assert "valid_unseen" in str(env.game_file(instance(2)))
    assert env.split_sources() == {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}


def test_training_games_from_valid_train_without_train(tmp_path, params_file) -> None:
    data = write_dataset(tmp_path / "data", train_folder="valid_train")
    params = load_params(
        params_file,
        ["env.name=alfworld", f"env.task_types=[{TASK}]", f"env.alfworld.data_dir={data}"],
    )
    with make_env(params.env) as env:
        assert env.variations(TASK, "train") == TRAIN
        assert "valid_train" in str(env.game_file(instance(TRAIN[0])))
        manifest = build_manifest(env, params)
    assert manifest.sources == {"train": "valid_train", "dev": "valid_seen", "test": "valid_unseen"}
    assert manifest.counts()[TASK] == {"u1": 2, "u2": 2, "test": 2}
    both = write_dataset(tmp_path / "both", train_folder="valid_train")
    write_dataset(both, train_folder="train")  # train/ present too: it wins
    with AlfWorldEnv(AlfworldConfig(data_dir=both)) as both:
        assert both.split_sources()["train"] == "train"


@pytest.mark.parametrize("expert", ["handcoded", "planner"])
def test_expert_solves_every_game(alfworld_data, expert) -> None:
    with AlfWorldEnv(AlfworldConfig(data_dir=alfworld_data, expert=expert)) as env:
        for variation in range(7):
            task, room = env.reset(instance(variation))
            assert task.startswith("put ") and "you see a cabinet 1" in room
            gold = env.gold_actions()
            assert env.gold_expert == expert
            assert gold[-1].startswith("put ") and " in/on " in gold[-1]  # stepflow's wording
            results = [env.step(action) for action in gold]
            assert all(r.valid for r in results)
            assert results[-1].success and results[-1].done and results[-1].reward == 1.0
            assert not any(r.success for r in results[:-1])


def test_golden_paths_are_capped(alfworld_data) -> None:
    config = AlfworldConfig(data_dir=alfworld_data, expert="handcoded", golden_max_steps=3)
    with AlfWorldEnv(config) as env:
        env.reset(instance(TRAIN[0]))
        gold = env.gold_actions()  # the handcoded path is longer than 3: the planner's
        assert env.gold_expert == "planner" and len(gold) == 5
        capped = replay_gold(env, instance(TRAIN[0]))
    assert capped.max_steps == 3 and len(capped.actions) == 3 and not capped.success
    assert capped.expert == "planner"


def test_wrong_then_right_student(env) -> None:
    task, _ = env.reset(instance(TRAIN[0]))
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
    # this game's grammar says `move apple 1 to countertop 1`; stepflow's wording is offered
    assert "put apple 1 in/on countertop 1" in env.valid_actions()
    assert not any(a.startswith("move ") for a in env.valid_actions())
    final = env.step("put apple 1 in/on countertop 1")
    assert final.success and final.score == 100.0
    assert final.info["command"] == "put apple 1 in/on countertop 1"


@pytest.mark.parametrize(
    "wording",
    [
        "move apple 1 to countertop 1",
        "put apple 1 on countertop 1",
        "Put apple 1 in countertop 1.",
        "place  apple 1 in/on countertop 1",
    ],
)
def test_every_placing_wording_reaches_the_goal(env, wording) -> None:
    env.restore(
        instance(TRAIN[0]),
        ["go to fridge 1", "open fridge 1", "take apple 1 from fridge 1", "go to countertop 1"],
    )
    result = env.step(wording)
    assert result.valid and result.success


def test_command_resolution_prefers_the_games_own_commands() -> None:
    real = ["put mug 1 in/on desk 2", "put mug 1 into bowl 1", "go to desk 1", "look"]
    assert resolve_command("put mug 1 in desk 2", real) == "put mug 1 in/on desk 2"
    assert resolve_command("move mug 1 to desk 2", real) == "put mug 1 in/on desk 2"
    assert resolve_command("put mug 1 into bowl 1", real) == "put mug 1 into bowl 1"
    assert resolve_command("GO TO  desk 1", real) == "go to desk 1"
    assert resolve_command("put mug 1 in/on desk 9", real) == "put mug 1 in/on desk 9"
    old = ["move mug 1 to desk 2"]
    assert resolve_command("put mug 1 in/on desk 2", old) == "move mug 1 to desk 2"


def test_restore_replays_to_the_same_state(env) -> None:
    actions = ["go to fridge 1", "open fridge 1", "take apple 1 from fridge 1"]
    env.reset(instance(TRAIN[0]))
    direct = [env.step(a) for a in actions][-1]
    restored = env.restore(instance(TRAIN[0]), actions)
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
    assert params.env.alfworld.expert == "planner" and params.env.alfworld.golden_max_steps == 40
    with make_env(params.env) as env:
        assert isinstance(env, AlfWorldEnv)
    with pytest.raises(ConfigError, match=r"env\.alfworld\.expert"):
        load_params(params_file, ["env.name=alfworld", "env.alfworld.expert=oracle"])


# -- the real 2.1.1 games ----------------------------------------------------------------
def test_real_splits_match_alfworld_and_eto(real_data, params_file) -> None:
    """140 valid_seen / 134 valid_unseen games after ALFWorld's filters; the unseen ones
    are exactly ETO's test list; training games come from valid_train (200)."""
    params = load_params(
        params_file,
        [
            "env.name=alfworld",
            f"env.task_types=[{', '.join(ALFWORLD_TASK_TYPES)}]",
            f"env.alfworld.data_dir={real_data}",
            "evaluation.protocol=eto",
            "splits.instances=eto",
            "splits.dev_per_task=null",
            "splits.test_per_task=null",
            "splits.train_per_task=null",
        ],
    )
    with make_env(params.env) as env:
        counts = {
            split: sum(len(env.variations(t, split)) for t in ALFWORLD_TASK_TYPES)
            for split in ("train", "dev", "test")
        }
        assert counts == {"train": 200, "dev": 140, "test": 134}
        unseen = {
            game_id(env.game_file(instance(v, t)))
            for t in ALFWORLD_TASK_TYPES
            for v in env.variations(t, "test")
        }
        assert unseen == set(eto_alfworld_games()) and len(unseen) == 134
        published = (SHARED_DATA / "eto" / "alfworld" / "gamefile_id.txt").read_text().split()
        assert list(eto_alfworld_games()) == [f"valid_unseen/{game}" for game in published]
        manifest = build_manifest(env, params)
    splits = Counter(e.split for e in manifest.instances)
    assert (splits["u1"] + splits["u2"], splits["dev"], splits["test"]) == (200, 140, 134)
    assert manifest.sources["train"] == "valid_train"
    assert manifest.sources["test"].startswith("valid_unseen")
    assert {evaluation_step_limit(params)(t) for t in ALFWORLD_TASK_TYPES} == {40}


def test_real_game_wordings_and_imported_data(real_data) -> None:
    """A published agent's trajectory (ETO's conversation format, `put X in/on Y`) imports,
    round-trips and replays to the goal on the real game, in every placing wording."""
    with AlfWorldEnv(AlfworldConfig(data_dir=real_data)) as env:
        variation = env.variations(TASK, "test")[0]
        task, room = env.reset(instance(variation))
        gold = env.gold_actions()
        assert 2 <= len(gold) <= 40 and gold[-1].startswith("put ") and " in/on " in gold[-1]
        record = {
            "id": f"alfworld_{variation}",
            "conversations": [
                {"from": "human", "value": "Interact with a household to solve a task. ..."},
                {"from": "gpt", "value": "OK"},
                {"from": "human", "value": f"{room}\nYour task is to: {task}."},
            ],
        }
        for action in gold:
            record["conversations"] += [
                {"from": "gpt", "value": f"Thought: next I {action}.\nAction: {action}"},
                {"from": "human", "value": "Observation: ..."},
            ]
        imported = from_conversation(record, {"env": "alfworld", "task_type": TASK})
        steps = [t for t in imported.assistant_turns() if t.action]
        assert [t.action for t in steps] == gold and all(t.loss for t in steps)
        assert from_conversation(to_conversation(imported)) == imported
        *path, place = [t.action for t in steps]
        obj, recep = place.removeprefix("put ").split(" in/on ")
        for wording in (place, f"put {obj} in {recep}", f"move {obj} to {recep}"):
            env.restore(instance(variation), path)
            assert env.step(wording).success, wording


@pytest.mark.slow
def test_pipeline_stages_on_real_games(tmp_path, real_data, embedded_dir) -> None:
    """prepare → init_sft → synthesize → evaluate on two real training games and one test
    game per task type (planner golden paths)."""
    outputs = run_tiny_stages(
        tmp_path,
        {
            "env.name": "alfworld",
            "env.task_types": list(ALFWORLD_TASK_TYPES),
            "env.alfworld": {"data_dir": str(real_data), "expert": "planner"},
            "env.step_limit": 2,
            "splits.train_per_task": 2,
            "splits.test_per_task": 1,
            "synthesis.max_corrections": 1,
        },
    )
    assert outputs["prepare"].kept == {"u1": 6, "u2": 6} and outputs["prepare"].dropped == []
    stats = json.loads((tmp_path / "data/prepare_stats.json").read_text())
    lengths = stats["path_lengths"]
    assert set(lengths) == set(ALFWORLD_TASK_TYPES)
    assert all(row["paths"] == 2 and 2 <= row["max"] <= 40 for row in lengths.values())
    assert all(row["expert_planner"] == 2 for row in lengths.values())
    manifest = json.loads((tmp_path / "data/manifest.json").read_text())
    assert manifest["sources"]["train"] == "valid_train"
    golden = list(read_trajectories(tmp_path / "data/golden_d1.jsonl"))
    assert all(t.env == "alfworld" and t.success for t in golden)
    assert "ALFWorld" in golden[0].turns[0].content
    assert outputs["synthesis"].episodes == 6
    assert len(outputs["metrics"].instances) == 6
