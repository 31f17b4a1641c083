"""The agent output parser on a table of well-formed and malformed model outputs."""

from __future__ import annotations

import pytest

from stepflow.agent.parser import (
    ParsedStep,
    clean_action,
    invalid_output_observation,
    parse_step,
)
from stepflow.agent.prompts import format_reflection, format_step

# (model output, expected thought, expected action)
PARSED = [
    ("Thought: I need the kitchen.\nAction: go to kitchen", "I need the kitchen.", "go to kitchen"),
    ("Action: look around", None, "look around"),
    ("action: open door to kitchen", None, "open door to kitchen"),
    ("ACTION: wait1", None, "wait1"),
    ("thought: hm\naction: look around", "hm", "look around"),
    ("Thought: go\nAction: go to kitchen<|im_end|>", "go", "go to kitchen"),
    ("Thought: go\nAction: go to kitchen</s>", "go", "go to kitchen"),
    ("Action: go to kitchen<|im_end|>\n<|im_start|>user\nObservation: ok", None, "go to kitchen"),
    ("<|im_start|>assistant\nThought: t\nAction: look around", "t", "look around"),
    ("Action: 1. go to kitchen", None, "go to kitchen"),
    ("Action: 2) open door to hallway", None, "open door to hallway"),
    ("Action: - look around", None, "look around"),
    ("Action: `go to kitchen`", None, "go to kitchen"),
    ("Action: ```go to kitchen```", None, "go to kitchen"),
    ('Action: "focus on soap"', None, "focus on soap"),
    ("Action: 'focus on soap'.", None, "focus on soap"),
    ("Action: **move soap to green box**", None, "move soap to green box"),
    ("**Thought:** think\n**Action:** look around", "think", "look around"),
    ("### Thought: think\n\n**Action**: look around", "think", "look around"),
    ("Action: go to kitchen.", None, "go to kitchen"),
    ("Action:   go   to    kitchen  ", None, "go to kitchen"),
    ("Action:\ngo to kitchen", None, "go to kitchen"),
    ("Action 1: look around", None, "look around"),
    ("Action： look around", None, "look around"),
    # several actions: the first wins
    ("Thought: t\nAction: go to kitchen\nAction: look around", "t", "go to kitchen"),
    ("Action: open door\nObservation: The door is open.\nAction: go to hallway", None, "open door"),
    # extra text before and after
    (
        "Sure! Let me think.\nThought: The soap is here.\nAction: focus on soap\nHope it helps!",
        "The soap is here.",
        "focus on soap",
    ),
    ("I will look first.\nAction: look around", "I will look first.", "look around"),
    ("Thought: multi\nline thought\nAction: look around", "multi line thought", "look around"),
    # inline label
    ("Thought: I should look. Action: look around", "I should look.", "look around"),
    # no "Action:" label: a bare action line
    ("go to kitchen", None, "go to kitchen"),
    ("  look around.  ", None, "look around"),
    (
        "Thought: I should open the door.\nopen door to kitchen",
        "I should open the door.",
        "open door to kitchen",
    ),
    ("`pick up thermometer`", None, "pick up thermometer"),
    # teacher-style turn
    (
        "Reflection: Focusing on the air was wrong.\nThought: Soap is not alive.\n"
        "Action: focus on soap",
        "Soap is not alive.",
        "focus on soap",
    ),
]

# (model output, error substring)
FAILED = [
    ("", "empty output"),
    ("   \n\t ", "empty output"),
    (None, "empty output"),
    ("<|im_end|>", "empty output"),
    ("</s>", "empty output"),
    ("Thought: I am not sure what to do.", "no action found"),
    ("I'm in the kitchen. I'm here to help you find a non-living thing.", "no action found"),
    ("Action:", "empty action"),
    ("Action: ``", "empty action"),
    ("Thought: hmm\nAction:   \n", "empty action"),
    ("Observation: You are in the kitchen.", "no action found"),
]


@pytest.mark.parametrize(("text", "thought", "action"), PARSED)
def test_parses(text: str, thought: str | None, action: str) -> None:
    step = parse_step(text)
    assert step.error is None, step
    assert step.ok
    assert step.action == action
    assert step.thought == thought


@pytest.mark.parametrize(("text", "error"), FAILED)
def test_unparseable_output_is_an_error_not_a_crash(text: str | None, error: str) -> None:
    step = parse_step(text)
    assert not step.ok
    assert step.action is None
    assert error in step.error
    message = invalid_output_observation(step.error)
    assert message.startswith("Invalid output:")
    assert "Thought: ..." in message and "Action: ..." in message


def test_reflection_is_kept() -> None:
    step = parse_step("Reflection: that was wrong\nThought: fix\nAction: look around")
    assert step.reflection == "that was wrong"


@pytest.mark.parametrize(
    ("thought", "action"),
    [("I need the kitchen.", "go to kitchen"), (None, "look around"), ("", "wait1")],
)
def test_round_trip_of_formatted_steps(thought: str | None, action: str) -> None:
    step = parse_step(format_step(thought, action))
    assert step == ParsedStep(thought or None, action)
    reflected = parse_step(format_reflection("oops", thought, action))
    assert (reflected.thought, reflected.action, reflected.reflection) == (
        thought or None,
        action,
        "oops",
    )


def test_custom_verbs_for_bare_actions() -> None:
    assert parse_step("buy apples", verbs={"buy"}).action == "buy apples"
    assert parse_step("buy apples").error == "no action found"


def test_clean_action() -> None:
    assert clean_action(" 3. `Go to kitchen`. \nmore") == "Go to kitchen"
    assert clean_action("") == ""
