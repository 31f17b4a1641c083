"""The ScienceWorld environment on the real simulator JAR."""

from __future__ import annotations

import pytest

from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.golden import replay_gold

SHORT_TASKS = [
    "find-non-living-thing",
    "find-plant",
    "lifespan-longest-lived",
    "lifespan-shortest-lived",
    "chemistry-mix-paint-secondary-color",
    "power-component",
]


@pytest.fixture(scope="module")
def env():
    with ScienceWorldEnv() as environment:
        yield environment


@pytest.mark.parametrize("task", SHORT_TASKS)
def test_gold_replay_reaches_full_score(env, task) -> None:
    variation = env.variations(task, "train")[0]
    replay = replay_gold(env, TaskInstance("scienceworld", task, variation, "train"))
    assert replay.success, (task, replay.scores)
    assert replay.final_score == 100
    assert len(replay.actions) <= replay.gold_length


def test_official_splits_are_disjoint(env) -> None:
    task = "find-non-living-thing"
    train, dev, test = (set(env.variations(task, s)) for s in ("train", "dev", "test"))
    assert train and dev and test
    assert not (train & dev) and not (train & test) and not (dev & test)


def test_reward_invalid_actions_and_failure(env) -> None:
    task = "find-non-living-thing"
    instance = TaskInstance("scienceworld", task, env.variations(task, "train")[0], "train")
    instruction, observation = env.reset(instance)
    assert "non-living thing" in instruction
    assert "This room is called" in observation
    bad = env.step("fly to the moon")
    assert not bad.valid and not bad.done
    assert 0 <= bad.reward <= 1 and bad.reward == pytest.approx(bad.score / 100)
    assert "look around" in env.valid_actions()
    # focusing on a living thing (an egg outside) fails this task: the simulator's score
    # is -100, the episode ends, the reward is clipped to 0 and it is no success
    env.step("teleport to outside")
    assert "a dove egg" in env.step("look around").observation
    failed = env.step("focus on dove egg")
    assert failed.score == -100
    assert failed.failed and failed.done and not failed.success and failed.reward == 0


def test_dead_jvm_is_restarted_and_state_restored() -> None:
    task = "find-non-living-thing"
    with ScienceWorldEnv() as env:
        instance = TaskInstance("scienceworld", task, env.variations(task, "train")[1], "train")
        env.reset(instance)
        gold = env.gold_actions()
        for action in gold[:2]:
            before = env.step(action)
        env.java_process().kill()
        env.java_process().wait()
        assert not env.alive()
        results = [env.step(action) for action in gold[2:]]
        assert env.restarts == 1
        assert results[0].score >= before.score  # progress was replayed, not lost
        assert results[-1].success
        proc = env.java_process()
    assert proc.poll() is not None  # closed: no JVM left behind


def test_ambiguous_options_are_listed_sorted() -> None:
    from stepflow.envs.scienceworld import sorted_choices

    observation = (
        "Ambiguous request: Please enter the number for the action you intended (or blank "
        "to cancel):\n0:\tgo door between kitchen and outside\n1:\tgo door between foundry "
        "and outside"
    )
    shown, options = sorted_choices(observation)
    assert shown.splitlines()[1:] == [
        "0:\tgo door between foundry and outside",
        "1:\tgo door between kitchen and outside",
    ]
    assert options == ["go door between kitchen and outside", "go door between foundry and outside"]
    assert sorted_choices("You move to the kitchen.") == ("You move to the kitchen.", None)
