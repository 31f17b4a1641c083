"""The ScienceWorld environment on the real simulator JAR."""

from __future__ import annotations

import re

import pytest

from stepflow.data.golden import replay_gold
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv

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


# find-non-living-thing 0 starts in the hallway: `go door` there is ambiguous between its six
# doors, and the task's red box is in the kitchen (moving there scores 25, elsewhere 17)
HALLWAY = TaskInstance("scienceworld", "find-non-living-thing", 0, "train")


def _options(observation: str) -> list[str]:
    """The options of an ambiguous-request observation, in the order shown (numbered 0..)."""
    head, *lines = observation.strip().splitlines()
    assert head.startswith("Ambiguous request"), observation
    numbered = [re.fullmatch(r"(\d+):\t(.+)", line) for line in lines]
    assert all(numbered) and [int(m.group(1)) for m in numbered] == list(range(len(lines)))
    return [m.group(2) for m in numbered]


def test_numeric_answer_runs_the_option_shown(env) -> None:
    """Each number the agent answers runs the option shown under it, as the bare simulator
    runs that option under its own number (the simulator's order changes between resets)."""
    from scienceworld import ScienceWorldEnv as Simulator

    simulator = Simulator("", envStepLimit=1000)
    try:
        simulator.load(HALLWAY.task_type, HALLWAY.variation, "easy", generateGoldPath=False)
        jvm_orders, scores = [], {}
        for indexes in ((0, 1, 2), (3, 4, 5)):  # two episodes: the sorted rooms in turn
            env.reset(HALLWAY)
            simulator.reset()
            for index in indexes:
                shown = _options(env.step("go door").observation)
                assert len(shown) == 6 and shown == sorted(shown), shown
                jvm_orders.append(env._choices)  # what the env's own simulator listed
                picked = shown[index]
                result = env.step(str(index))

                listed = _options(simulator.step("go door")[0])
                assert sorted(listed) == shown
                observation, _, _, info = simulator.step(str(listed.index(picked)))

                rooms = re.fullmatch(r"go door between (.+) and (.+)", picked).groups()
                [room] = [r for r in rooms if r != "hallway"]
                assert observation == f"You move through the door to the {room}."
                assert result.valid and result.observation == observation, (index, picked)
                assert result.score == info["score"], (index, picked)
                scores[room] = result.score
                env.step("teleport to hallway")
                simulator.step("teleport to hallway")
    finally:
        simulator.close()
    # the answers had to be translated: the env's simulator did not list them sorted
    assert any(order != sorted(order) for order in jvm_orders), jvm_orders
    # the first episode visits art studio, bedroom, greenhouse; the second starts in the
    # kitchen, where the task's red box is
    assert scores["kitchen"] > max(scores[r] for r in ("art studio", "bedroom", "greenhouse"))
