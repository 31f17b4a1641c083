"""The reference teacher's decisions on real ScienceWorld episodes.

Each row: a task instance, the steps already accepted (the real gold prefix, or what a
student did), the student's next action, and the verdict expected of the teacher — right,
or wrong with its reason and the correction it must propose. The steps run in the real
simulator; the reference is the instance's real gold replay, rendered as `prepare` does.
"""

from __future__ import annotations

import asyncio

import pytest

from stepflow.agent.prompts import format_observation, format_step, opening_turns
from stepflow.data.golden import render_golden, replay_gold, template_thought
from stepflow.data.trajectory import Provenance, Turn
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.teacher.base import StepFacts
from stepflow.teacher.reference import ReferenceTeacher

FIND = TaskInstance("scienceworld", "find-non-living-thing", 1, "u2")
LIFESPAN = TaskInstance("scienceworld", "lifespan-longest-lived", 1, "u2")
# find-non-living-thing 1 (score after each): open door to hallway (8, a no-op), go to hallway
# (17), open door to kitchen (17, a no-op), go to kitchen (25), look around (25), focus on
# THING (75), move THING to green box (100). Which non-living thing the simulator's gold path
# picks changes from one load to the next (soap, thermometer, a glass jar, ...), so THING is
# read from the reference replay and the rows below name it as "{thing}".
FIND_GOLD = [
    "open door to hallway",
    "go to hallway",
    "open door to kitchen",
    "go to kitchen",
    "look around",
    "focus on {thing}",
    "move {thing} to green box",
]
# lifespan-longest-lived 1: ... go to outside (50), focus on baby baby brown bear (100)
LIFESPAN_PREFIX = [
    "open door to hallway",
    "go to hallway",
    "open door to kitchen",
    "go to kitchen",
    "open door to outside",
    "go to outside",
]

# (instance, accepted steps, student action, expected: None = right, else (reason, correction))
DECISIONS = [
    (FIND, [], "open door to hallway", None),
    (FIND, [], "open the door to the hallway", None),  # the simulator reads it the same
    (FIND, [], "go to hallway", None),  # the gold's no-op open skipped
    # a generic action matches only the next reference step, not the "look around" further on
    (FIND, FIND_GOLD[:2], "look around", ("no_progress", "open door to kitchen")),
    (FIND, FIND_GOLD[:2], "teleport to kitchen", None),  # raised the score
    # ... and the position followed it: the reference's "look around" comes next
    (FIND, [*FIND_GOLD[:2], "teleport to kitchen"], "look around", None),
    (FIND, [*FIND_GOLD[:2], "teleport to kitchen"], "pick up soap", ("no_progress", "look around")),
    (FIND, FIND_GOLD[:4], "focus on the soap", None),  # any non-living thing will do
    (FIND, FIND_GOLD[:4], "focus on air", None),  # air is a non-living thing: the score rose
    (FIND, FIND_GOLD[:6], "move {thing} to blue box", ("invalid", "move {thing} to green box")),
    (FIND, FIND_GOLD[:6], "fly to the moon", ("invalid", "move {thing} to green box")),
    # the student left the room where the reference moves the thing: first back there
    (FIND, FIND_GOLD[:6], "go to hallway", ("no_progress", "go to kitchen")),
    (FIND, FIND_GOLD[:6], "pick up {thing}", None),  # 75 -> 83, on the way to the box
    # short of the reference's next score: its step is still to do
    (
        FIND,
        [*FIND_GOLD[:6], "pick up {thing}"],
        "look around",
        ("no_progress", "move {thing} to green box"),
    ),
    (LIFESPAN, LIFESPAN_PREFIX, "focus on brown bear", None),
    (LIFESPAN, LIFESPAN_PREFIX, "focus on air", ("failed", "focus on baby baby brown bear")),
    (LIFESPAN, LIFESPAN_PREFIX, "look around", ("no_progress", "focus on baby baby brown bear")),
]


@pytest.fixture(scope="module")
def simulator():
    with ScienceWorldEnv() as env:
        yield env


@pytest.fixture(scope="module")
def references(simulator):
    """The real gold replay of each instance, rendered as the prepare stage renders it."""
    rendered = {}
    for instance in (FIND, LIFESPAN):
        replay = replay_gold(simulator, instance)
        assert replay.success
        thoughts = [template_thought(a) for a in replay.actions]
        rendered[instance.key] = render_golden(replay, thoughts, None, Provenance(source="golden"))
    find_gold = [t.action for t in rendered[FIND.key].assistant_turns()]
    thing = find_gold[5].removeprefix("focus on ")
    assert find_gold == [step.format(thing=thing) for step in FIND_GOLD]
    return rendered, thing


def _facts(env: ScienceWorldEnv, instance: TaskInstance, accepted: list[str], action: str):
    instruction, observation = env.reset(instance)
    turns = opening_turns(instance.env, instruction, observation)
    turns[-1] = turns[-1].model_copy(update={"score": env.start_score})
    score = env.start_score
    for step in accepted:
        result = env.step(step)
        assert result.valid and not result.failed, step
        turns.append(
            Turn(
                role="assistant",
                kind="step",
                loss=True,
                content=format_step(None, step),
                action=step,
            )
        )
        turns.append(
            Turn(
                role="user",
                kind="observation",
                content=format_observation(result.observation),
                score=result.score,
            )
        )
        score = result.score
    result = env.step(action)
    return StepFacts(
        instance=instance,
        instruction=instruction,
        history=turns,
        thought=None,
        action=action,
        observation=format_observation(result.observation),
        valid=result.valid,
        score=result.score,
        previous_score=score,
        failed=result.failed,
        done=result.done,
        step_index=len(accepted),
    )


@pytest.mark.parametrize(
    ("instance", "accepted", "action", "expected"),
    DECISIONS,
    ids=[f"{i.task_type}:{len(a)}:{act}" for i, a, act, _ in DECISIONS],
)
def test_reference_teacher_decision(simulator, references, instance, accepted, action, expected):
    rendered, thing = references
    accepted = [step.format(thing=thing) for step in accepted]
    action = action.format(thing=thing)
    facts = _facts(simulator, instance, accepted, action)
    judgment = asyncio.run(ReferenceTeacher().judge(facts, rendered[instance.key]))
    if expected is None:
        assert judgment.correct, (judgment.reason, judgment.action)
    else:
        reason, correction = expected[0], expected[1].format(thing=thing)
        assert not judgment.correct
        assert (judgment.reason, judgment.action) == (reason, correction)
        assert judgment.thought == template_thought(correction)
        assert action in judgment.reflection and correction in judgment.reflection


LIVING = TaskInstance("scienceworld", "find-living-thing", 114, "u2")


def test_the_correction_is_the_move_back_when_the_student_left_the_references_room(simulator):
    # find-living-thing 114, compressed: teleport to outside, look around, focus on THING,
    # pick up THING, teleport to BOX_ROOM, move THING to the box. A student that goes
    # straight to the box's room raises the score, so the reference's position passes the
    # move outside; its next step (focus on THING) cannot run in the box's room.
    replay = replay_gold(simulator, LIVING, compress=True)
    assert replay.success
    thoughts = [template_thought(a) for a in replay.actions]
    reference = render_golden(replay, thoughts, None, Provenance(source="golden"))
    gold = [t.action for t in reference.assistant_turns()]
    assert gold[0] == "teleport to outside" and gold[2].startswith("focus on"), gold
    assert gold[4].startswith("teleport to") and gold[4] != gold[0], gold

    facts = _facts(simulator, LIVING, [gold[4]], "look around")
    assert facts.score == facts.previous_score > 0 and facts.valid
    judgment = asyncio.run(ReferenceTeacher().judge(facts, reference))
    assert (judgment.reason, judgment.action) == ("no_progress", "teleport to outside")
    assert judgment.thought == template_thought("teleport to outside")

    # the correction runs where the student is; the reference's focus is valid after it and
    # is what the teacher proposes next
    moved = simulator.step(judgment.action)
    assert moved.valid and not moved.failed
    history = [
        *facts.history,
        Turn(role="assistant", kind="erroneous_step", loss=False, content="", action="look around"),
        Turn(role="user", kind="observation", content=facts.observation, score=facts.score),
        Turn(role="assistant", kind="reflection", loss=True, content="", action=judgment.action),
        Turn(
            role="user",
            kind="observation",
            content=format_observation(moved.observation),
            score=moved.score,
        ),
    ]
    waited = simulator.step("look around")
    then = StepFacts(
        instance=LIVING,
        instruction=facts.instruction,
        history=history,
        thought=None,
        action="look around",
        observation=format_observation(waited.observation),
        valid=waited.valid,
        score=waited.score,
        previous_score=moved.score,
        failed=waited.failed,
        done=waited.done,
        step_index=3,
    )
    again = asyncio.run(ReferenceTeacher().judge(then, reference))
    assert (again.reason, again.action) == ("no_progress", gold[2])
    assert simulator.step(gold[2]).score > waited.score  # the focus runs here
