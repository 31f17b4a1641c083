"""LLM-written reflections are cleaned the same way on every path: the LLM judge's JSON
answer and the reference teacher's LLM reflection; an empty one is malformed and falls back."""

from __future__ import annotations

import asyncio
import json

import pytest

from stepflow.agent.prompts import format_reflection
from stepflow.teacher.base import clean_reflection
from stepflow.teacher.llm import LLMTeacher, MalformedAnswer, parse_answer
from stepflow.teacher.reference import ReferenceTeacher
from tests.test_teacher import GOLD, ScriptedModel, _facts, _reference

MALFORMED_SHAPES = [
    ("Reflection: I went to the wrong room.", "I went to the wrong room."),
    ("Reflection: Reflection: I went to the wrong room.", "I went to the wrong room."),
    ("**Reflection:** I went to the *wrong* room.", "I went to the wrong room."),
    ("### Reflection\nI went to the wrong room.", "I went to the wrong room."),
    (
        "I went to the wrong room.\nThought: the kitchen is next door.\nAction: go to kitchen",
        "I went to the wrong room.",
    ),
    ("I went to the wrong room. Action: go to kitchen", "I went to the wrong room."),
    ("I went to the wrong room.\n\nAlso, I should plan better.", "I went to the wrong room."),
    ("```\nReflection: I went to the wrong room.\n```", "I went to the wrong room."),
    ('- "I went to the wrong room."', "I went to the wrong room."),
    ("I went to the wrong room.<|im_end|>garbage", "I went to the wrong room."),
]
EMPTY_SHAPES = [
    "",
    "   ",
    "Reflection:",
    "Reflection:\nThought: go\nAction: go to kitchen",
    "```\n```",
]


@pytest.mark.parametrize(("text", "clean"), MALFORMED_SHAPES)
def test_clean_reflection(text, clean) -> None:
    assert clean_reflection(text) == clean
    trained = format_reflection(clean_reflection(text), "Back.", "go to kitchen")
    assert trained.count("Reflection:") == 1 and trained.count("Action:") == 1


@pytest.mark.parametrize("text", EMPTY_SHAPES)
def test_nothing_left_is_empty(text) -> None:
    assert clean_reflection(text) == ""


def _wrong(reflection: str, thought: str = "Back to the kitchen.", action: str = "go to kitchen"):
    return json.dumps(
        {"verdict": "wrong", "reflection": reflection, "thought": thought, "action": action}
    )


@pytest.mark.parametrize(("text", "clean"), MALFORMED_SHAPES)
def test_llm_judge_answers_are_cleaned(text, clean) -> None:
    answer = parse_answer(_wrong(text, "Thought: Back to the kitchen.", "Action: go to kitchen"))
    assert (answer.reflection, answer.thought, answer.action) == (
        clean,
        "Back to the kitchen.",
        "go to kitchen",
    )


@pytest.mark.parametrize("text", EMPTY_SHAPES)
def test_llm_judge_answer_with_no_reflection_left_is_malformed(text) -> None:
    with pytest.raises(MalformedAnswer, match="reflection"):
        parse_answer(_wrong(text))


def test_llm_teacher_trains_the_cleaned_reflection_and_falls_back_on_empty() -> None:
    model = ScriptedModel([_wrong("Reflection: Reflection: Wrong room.\nAction: go to kitchen")])
    teacher = LLMTeacher(model, max_retries=0, fallback="reference")
    judgment = asyncio.run(teacher.judge(_facts("go to bathroom", []), _reference(GOLD)))
    assert judgment.reflection == "Wrong room." and not judgment.fallback
    turn = format_reflection(judgment.reflection, judgment.thought, judgment.action)
    assert turn.startswith("Reflection: Wrong room.\nThought:")

    model = ScriptedModel([_wrong("Reflection:"), _wrong("**Reflection:**\nThought: x")])
    teacher = LLMTeacher(model, max_retries=1, fallback="reference")
    judgment = asyncio.run(teacher.judge(_facts("go to bathroom", []), _reference(GOLD)))
    assert judgment.fallback and not judgment.correct  # the reference teacher corrected it
    assert (teacher.stats.malformed, teacher.stats.retries, teacher.stats.fallbacks) == (2, 1, 1)


@pytest.mark.parametrize(("text", "clean"), MALFORMED_SHAPES[:4])
def test_reference_teacher_cleans_llm_reflections_the_same_way(text, clean) -> None:
    teacher = ReferenceTeacher(reflection_backend=ScriptedModel([text]))
    judgment = asyncio.run(teacher.judge(_facts("go to bathroom", []), _reference(GOLD)))
    assert judgment.reflection == clean and teacher.stats.malformed == 0


@pytest.mark.parametrize("text", EMPTY_SHAPES)
def test_reference_teacher_falls_back_to_the_template_on_empty(text) -> None:
    teacher = ReferenceTeacher(reflection_backend=ScriptedModel([text]))
    judgment = asyncio.run(teacher.judge(_facts("go to bathroom", []), _reference(GOLD)))
    assert teacher.stats.malformed == 1
    assert "go to bathroom" in judgment.reflection  # the deterministic template
