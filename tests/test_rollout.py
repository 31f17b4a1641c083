"""Rollouts of the real embedded model on real ScienceWorld tasks, and `stepflow rollout`
interrupted by SIGKILL then resumed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepflow.agent.parser import parse_step
from stepflow.agent.prompts import format_step
from stepflow.config import GenerationConfig
from stepflow.data.selection import OfficialSplitLabels, parse_variations, select_instances
from stepflow.data.trajectory import Trajectory, read_trajectories
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.llm.local import LocalBackend
from stepflow.rollout.engine import rollout
from stepflow.rollout.episode import EpisodeSettings

TASK = "find-non-living-thing"
SHORT = [
    "-S",
    "env.step_limit=2",
    "-S",
    "student.generation.max_new_tokens=16",
    "-S",
    "agent.max_observation_chars=400",
    "-S",
    "agent.one_shot=false",
]


def check_trajectory(trajectory: Trajectory, limit: int) -> None:
    """Structure and counters of a finished episode."""
    assert Trajectory.model_validate_json(trajectory.model_dump_json()) == trajectory
    assert trajectory.num_steps == limit or trajectory.done
    assert trajectory.num_steps <= limit
    executed = 0
    for turn in trajectory.assistant_turns():
        assert turn.kind == "step"
        if turn.action is None:
            assert not turn.loss
        else:
            executed += 1
            assert turn.loss
            parsed = parse_step(turn.content)
            assert turn.content == format_step(parsed.thought, turn.action)
    stats = trajectory.stats
    assert stats.parse_failures + executed == trajectory.num_steps
    assert stats.invalid_actions <= executed
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    assert stats.wall_s > 0
    # where the time went: each part measured, together within the episode's wall time
    assert stats.llm_s > 0 and stats.env_s > 0 and stats.prompt_s >= 0 and stats.teacher_s == 0
    assert stats.prompt_s + stats.llm_s + stats.env_s <= stats.wall_s + 0.01
    assert trajectory.provenance.student_model == "embedded"
    assert trajectory.provenance.source == "rollout"


@pytest.mark.slow
def test_concurrent_episodes_of_the_embedded_model(tmp_path: Path, embedded_dir) -> None:
    instances = [TaskInstance("scienceworld", TASK, v, "train") for v in (1, 2)]
    backend = LocalBackend("embedded", generation=GenerationConfig(max_new_tokens=16))
    settings = EpisodeSettings(step_limit=3, max_observation_chars=400, params_hash="test")

    async def main():
        try:
            return await rollout(
                instances,
                backend,
                tmp_path / "out.jsonl",
                env_factory=ScienceWorldEnv,
                settings=settings,
                concurrency=2,
                progress=True,
            )
        finally:
            await backend.aclose()

    summary = asyncio.run(main())
    assert (summary.episodes, summary.new_episodes, summary.errors) == (2, 2, {})
    trajectories = list(read_trajectories(tmp_path / "out.jsonl"))
    assert sorted(t.key for t in trajectories) == sorted(i.key for i in instances)
    for trajectory in trajectories:
        check_trajectory(trajectory, 3)
    assert summary.steps == sum(t.num_steps for t in trajectories)
    assert summary.parse_failures == sum(t.stats.parse_failures for t in trajectories)
    assert summary.prompt_tokens == backend.stats.prompt_tokens
    assert backend.stats.requests == summary.steps
    assert backend.stats.cached_tokens > 0  # later turns reuse the conversation prefix
    assert summary.llm_s == pytest.approx(sum(t.stats.llm_s for t in trajectories), abs=0.01)
    assert summary.env_s == pytest.approx(sum(t.stats.env_s for t in trajectories), abs=0.01)
    # the backend's time divides into prefill and decode
    assert backend.stats.prefill_s > 0 and backend.stats.decode_s > 0
    assert backend.stats.prefill_s + backend.stats.decode_s <= backend.stats.generate_s
    assert len(backend.sessions) == 0  # every episode released its cache


def cli(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "rollout", *args]
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow
def test_cli_rollout_resumes_after_sigkill(tmp_path: Path, params_file: Path, embedded_dir) -> None:
    output = tmp_path / "out.jsonl"
    args = ["-p", str(params_file), *SHORT, "--task", TASK, "--variations", "1-3"]
    args += ["--split", "train", "-o", str(output), "--concurrency", "1", "--no-progress"]
    first = cli(*args, cwd=tmp_path)
    deadline = time.monotonic() + 600
    try:
        while not lines(output):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no episode finished in time"
            time.sleep(0.2)
    finally:
        # the whole process group: the CLI and the simulator JVM it started
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    landed = lines(output)
    assert 1 <= len(landed) < 3

    second = cli(*args, cwd=tmp_path)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["skipped"] == len(landed)
    assert summary["new_episodes"] == 3 - len(landed)
    assert (summary["episodes"], summary["remaining"], summary["errors"]) == (3, 0, {})
    final = lines(output)
    assert final[: len(landed)] == landed
    trajectories = list(read_trajectories(output))
    keys = [t.key for t in trajectories]
    assert sorted(keys) == [f"scienceworld/{TASK}/{v}" for v in (1, 2, 3)]
    for trajectory in trajectories:
        check_trajectory(trajectory, 2)
        assert trajectory.split == "train"


def test_cli_rejects_a_bad_selection(tmp_path: Path, params_file: Path) -> None:
    for args in (["--variations", "1"], ["--split", "test"], ["--task", TASK, "--variations", "x"]):
        proc = cli("-p", str(params_file), "-o", str(tmp_path / "o.jsonl"), *args, cwd=tmp_path)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "error" in err


def test_instance_selection() -> None:
    assert parse_variations("3, 1,5-7,3") == [1, 3, 5, 6, 7]
    manifest = [
        TaskInstance("scienceworld", TASK, 1, "u1"),
        TaskInstance("scienceworld", TASK, 2, "test"),
        TaskInstance("scienceworld", "other", 4, "test"),
    ]
    chosen = select_instances("scienceworld", manifest=manifest, split="test")
    assert [i.key for i in chosen] == [f"scienceworld/{TASK}/2", "scienceworld/other/4"]
    chosen = select_instances("scienceworld", manifest=manifest, split="test", task=TASK)
    assert len(chosen) == 1
    chosen = select_instances(
        "scienceworld", manifest=manifest, task=TASK, variations=[1, 9], split="dev"
    )
    assert [i.split for i in chosen] == ["u1", "dev"]
    chosen = select_instances("scienceworld", manifest=manifest, split="test", limit=1)
    assert len(chosen) == 1


def test_official_split_labels() -> None:
    with ScienceWorldEnv() as env:
        splits = {name: env.variations(TASK, name) for name in ("train", "dev", "test")}
    picks = [splits["train"][0], splits["test"][0]]
    with OfficialSplitLabels(ScienceWorldEnv) as label:
        chosen = select_instances("scienceworld", task=TASK, variations=picks, label=label)
    assert [i.split for i in chosen] == ["train", "test"]


def test_rollouts_run_torch_on_the_configured_threads(tmp_path, monkeypatch) -> None:
    import torch

    import stepflow.rollout.job as job_module
    from stepflow.config import load_params
    from stepflow.rollout.job import RolloutJob
    from tests.conftest import REPO

    seen: list[int] = []

    async def spy(*args, **kwargs):  # the real engine, with torch's threads noted as it starts
        seen.append(torch.get_num_threads())
        return await rollout(*args, **kwargs)

    monkeypatch.setattr(job_module, "rollout", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threads, expected in ((1, 1), (None, 2)):
            params = load_params(REPO / "params.yaml", {"rollout.threads": threads})
            RolloutJob(params, (), tmp_path / f"{threads}.jsonl", progress=False).run()
            assert seen[-1] == expected
            assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
