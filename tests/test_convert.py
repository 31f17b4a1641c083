"""Conversation-format import/export."""

from __future__ import annotations

import json

import pytest

from stepflow.data.convert import export_conversations, from_conversation, import_conversations
from stepflow.data.jsonl import DataError
from stepflow.data.trajectory import Turn
from tests.test_trajectory_io import make_trajectory


def _with_reflection():
    trajectory = make_trajectory(4, steps=1)
    turns = list(trajectory.turns)
    turns[2] = turns[2].model_copy(update={"kind": "erroneous_step", "loss": False})
    turns += [
        Turn(
            role="assistant",
            kind="reflection",
            loss=True,
            action="go to kitchen",
            content="Reflection: wrong room.\nThought: go back.\nAction: go to kitchen",
        ),
        Turn(role="user", kind="observation", content="Observation: You move to the kitchen."),
    ]
    return trajectory.model_copy(update={"turns": turns, "num_steps": 2})


def test_export_import_round_trip_is_lossless(tmp_path) -> None:
    originals = [make_trajectory(0), _with_reflection()]
    path = tmp_path / "conv.jsonl"
    assert export_conversations(originals, path) == 2
    record = json.loads(path.read_text().splitlines()[1])
    assert [c["from"] for c in record["conversations"][:3]] == ["system", "human", "gpt"]
    assert record["conversations"][2]["loss"] is False
    assert list(import_conversations(path)) == originals


def test_foreign_record_kinds_are_inferred() -> None:
    record = {
        "id": "alfworld_12",
        "conversations": [
            {"from": "human", "value": "Interact with a household...", "loss": None},
            {"from": "gpt", "value": "Thought: x\nAction: go to desk 1", "loss": True},
            {"from": "human", "value": "Observation: on the desk 1 you see a pen.", "loss": None},
            {"from": "gpt", "value": "Thought: y\nAction: take pen", "loss": False},
            {"from": "human", "value": "Observation: nothing happens.", "loss": None},
            {
                "from": "gpt",
                "value": "Reflection: wrong.\nThought: z\nAction: take pen 1",
                "loss": True,
            },
        ],
    }
    trajectory = from_conversation(record, {"env": "alfworld", "split": "u2"})
    assert [t.kind for t in trajectory.turns] == [
        "instruction",
        "step",
        "observation",
        "erroneous_step",
        "observation",
        "reflection",
    ]
    assert trajectory.env == "alfworld" and trajectory.split == "u2"
    assert trajectory.num_steps == 3
    assert trajectory.provenance.source == "import"


def test_bad_record_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    bad = {"conversations": [{"from": "robot", "value": "hi"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: .*unknown speaker 'robot'"):
        list(import_conversations(path))
