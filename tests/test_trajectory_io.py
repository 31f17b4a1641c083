"""Trajectory schema validation and crash-safe JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from stepflow.data.jsonl import DataError, JsonlAppender, atomic_write_text
from stepflow.data.trajectory import (
    Provenance,
    Trajectory,
    TrajectoryLog,
    Turn,
    read_trajectories,
    write_trajectories,
)


def make_trajectory(variation: int = 0, steps: int = 2) -> Trajectory:
    turns = [
        Turn(role="system", kind="system", content="You are an agent."),
        Turn(role="user", kind="instruction", content="Task: find a thing.\nObservation: a room"),
    ]
    for i in range(steps):
        turns.append(
            Turn(
                role="assistant",
                kind="step",
                loss=True,
                action=f"look at {i}",
                content=f"Thought: t{i}\nAction: look at {i}",
            )
        )
        turns.append(Turn(role="user", kind="observation", content=f"Observation: o{i}"))
    return Trajectory(
        env="scienceworld",
        task_type="find-plant",
        variation=variation,
        split="u1",
        instruction="find a thing",
        turns=turns,
        reward=1.0,
        score=100,
        success=True,
        num_steps=steps,
        provenance=Provenance(source="golden"),
    )


def test_schema_rejects_inconsistent_trajectories() -> None:
    good = make_trajectory()
    data = good.model_dump()
    with pytest.raises(ValidationError, match="num_steps"):
        Trajectory.model_validate({**data, "num_steps": 5})
    with pytest.raises(ValidationError, match="only assistant turns"):
        Turn(role="user", kind="observation", content="x", loss=True)
    with pytest.raises(ValidationError, match="never trained"):
        Turn(role="assistant", kind="erroneous_step", content="x", loss=True)
    with pytest.raises(ValidationError, match="cannot have kind"):
        Turn(role="assistant", kind="observation", content="x")
    turns = data["turns"]
    with pytest.raises(ValidationError, match="in a row"):
        Trajectory.model_validate({**data, "turns": turns[:3] + turns[2:3], "num_steps": 2})
    with pytest.raises(ValidationError):
        Trajectory.model_validate({**data, "reward": 1.5})
    with pytest.raises(ValidationError):
        Trajectory.model_validate({**data, "schema_version": 2})


def test_corrupt_line_reports_file_and_line(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_trajectory(i) for i in range(3)])
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"reward":1.0', '"reward":"lots"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid record: reward"):
        list(read_trajectories(path))
    lines[1] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2:"):
        list(read_trajectories(path))


def test_appender_cuts_an_unfinished_tail_and_resumes(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    with TrajectoryLog(path) as log:
        log.append(make_trajectory(0))
        log.append(make_trajectory(1))
    full = path.read_bytes()
    path.write_bytes(full + make_trajectory(2).model_dump_json().encode()[:40])  # killed mid-line
    with TrajectoryLog(path) as log:
        assert set(log.done) == {"scienceworld/find-plant/0", "scienceworld/find-plant/1"}
        log.append(make_trajectory(2))
    records = list(read_trajectories(path))
    assert [r.variation for r in records] == [0, 1, 2]


def test_appender_repairs_file_that_is_only_a_fragment(tmp_path) -> None:
    path = tmp_path / "frag.jsonl"
    path.write_bytes(b'{"schema_version": 1, "env"')
    with JsonlAppender(path) as appender:
        assert appender.dropped_tail_bytes == 27
        appender.append({"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}


def test_atomic_write_leaves_no_partial_file(tmp_path) -> None:
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    class Boom(Exception):
        pass

    class Exploding(str):
        def encode(self, *args, **kwargs):
            raise Boom

    with pytest.raises(Boom):
        atomic_write_text(path, Exploding("new"))
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_episodes_are_taken_out_for_a_retry(tmp_path: Path) -> None:
    path = tmp_path / "episodes.jsonl"
    failed = make_trajectory(1).model_copy(update={"failure": "EndpointError: down"})
    with TrajectoryLog(path) as log:
        log.append(make_trajectory(0))
        log.append(failed)
        log.append(make_trajectory(2))
    with TrajectoryLog(path) as log:  # without retry_failed, a failed episode counts as done
        assert sorted(log.done) == sorted(t.key for t in (make_trajectory(v) for v in (0, 1, 2)))
        assert log.retried == []
    with TrajectoryLog(path, retry_failed=True) as log:
        assert [t.key for t in log.retried] == [failed.key]
        assert failed.key not in log.done and len(log.done) == 2
        log.append(make_trajectory(1))
    stored = list(read_trajectories(path))
    assert [t.variation for t in stored] == [0, 2, 1]
    assert all(t.failure is None for t in stored)
