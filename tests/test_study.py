"""The study's summary: per-seed figures from evaluation files, the paired difference on
identical instances, the ETO-list subset, and the config that drives it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepflow.config import load_params
from stepflow.data.trajectory import Provenance, Trajectory, Turn, write_trajectories
from stepflow.evaluate.evaluation import eval_paths, evaluation_digest
from stepflow.evaluate.protocols import eto_variations
from stepflow.study.seeds import seed_overrides
from stepflow.study.summary import paired_difference, write_summary

REPO = Path(__file__).resolve().parent.parent
TASK = "find-plant"


def episode(variation: int, success: bool, digest: str = "x") -> Trajectory:
    turns = [
        Turn(role="system", kind="system", content="You are an agent."),
        Turn(role="user", kind="instruction", content="Task: find a plant."),
        Turn(role="assistant", kind="step", loss=True, action="look around", content="x"),
        Turn(role="user", kind="observation", content="Observation: a room"),
    ]
    return Trajectory(
        env="scienceworld",
        task_type=TASK,
        variation=variation,
        split="test",
        instruction="find a plant",
        turns=turns,
        reward=1.0 if success else 0.25,
        score=100.0 if success else 25.0,
        max_score=100.0 if success else 50.0,
        success=success,
        num_steps=1,
        provenance=Provenance(source="evaluation", params_hash=digest),
    )


def test_the_paired_difference_is_taken_on_instances_every_seed_ran() -> None:
    first = [{"a": 1.0, "b": 1.0, "c": 0.0, "only_first": 1.0}, {"a": 1.0, "b": 0.0, "c": 0.0}]
    second = [{"a": 0.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 0.0, "c": 1.0}]
    interval, units = paired_difference(first, second, samples=2000, confidence=0.95, seed=0)
    # differences: seed 0 a +1, b 0, c 0; seed 1 a +1, b 0, c -1; `only_first` has no pair
    assert units == 3
    assert interval.mean == pytest.approx((1 + 0 - 0.5) / 3)
    assert -1.0 <= interval.low < interval.mean < interval.high <= 1.0


def test_the_summary_reads_every_seed_and_pairs_the_compared_agents(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = {
        "env.task_types": [TASK],
        "evaluation.agents": ["golden", "step"],
        "evaluation.protocol": "eto",
        "study.seeds": [0, 1],
    }
    params = load_params(REPO / "params.yaml", overrides)
    listed = eto_variations(TASK, "test")[0]  # one instance of ETO's fixed list
    variations = [listed, 1000, 1001, 1002]
    outcomes = {  # (seed, agent) -> success per variation
        (0, "golden"): [True, False, False, False],
        (0, "step"): [True, True, False, False],
        (1, "golden"): [False, False, True, False],
        (1, "step"): [True, False, True, True],
    }
    runs = {}
    for seed in (0, 1):
        run = runs[seed] = load_params(
            REPO / "params.yaml", {**overrides, **seed_overrides(params, seed)}
        )
        for agent in ("golden", "step"):
            # what evaluation leaves: the adapter it ran, episodes marked with the
            # evaluation's identity, the agent's metrics file
            adapter = run.paths.models / agent
            adapter.mkdir(parents=True)
            (adapter / "adapter_config.json").write_text("{}")
            (adapter / "adapter_model.safetensors").write_bytes(f"{seed}{agent}".encode())
            data = [{"file": "golden_d1.jsonl", "sha256": "x", "trajectories": 10 + seed}]
            card = {"data": data, "token_stats": {"trained_tokens": 500}}
            (adapter / "stepflow.json").write_text(json.dumps(card))
            digest = evaluation_digest(run, agent)
            wins = outcomes[(seed, agent)]
            path, _ = eval_paths(run, agent, "test")
            write_trajectories(
                path, [episode(v, w, digest) for v, w in zip(variations, wins, strict=True)]
            )
            _, metrics = eval_paths(run, agent, "test")
            metrics.write_text("{}")
            (run.paths.metrics).mkdir(parents=True, exist_ok=True)
            (run.paths.metrics / f"{agent}.json").write_text("{}")
    # an evaluation made with other settings is not counted
    stale = runs[1].paths.data / "eval" / "golden" / "test.jsonl"
    stale_copy = stale.read_text()
    write_trajectories(stale, [episode(v, True, "other") for v in variations])
    partial = write_summary(params, runs)
    assert partial["agents"]["golden"]["seeds"].keys() == {"0"}
    assert partial["seeds_with_results"] == [0, 1]  # step has both
    stale.write_text(stale_copy)
    (tmp_path / "study" / "seed-1" / "timings.json").write_text(json.dumps({"prepare": 36.0}))

    summary = write_summary(params, runs)

    step, golden = summary["agents"]["step"], summary["agents"]["golden"]
    assert step["seeds"]["0"]["success"] == 0.5 and step["seeds"]["1"]["success"] == 0.75
    assert step["success"]["mean"] == pytest.approx(0.625)
    assert golden["success"]["mean"] == pytest.approx(0.25)
    # ETO reward: the highest score reached / 100
    assert golden["seeds"]["0"]["reward"] == pytest.approx((1.0 + 3 * 0.5) / 4)
    assert step["seeds"]["1"]["trajectories"] == 11
    assert step["seeds"]["0"]["eto_subset"] == {"episodes": 1, "success": 1.0}
    paired = summary["paired"]
    assert (paired["first"], paired["second"], paired["instances"]) == ("step", "golden", 4)
    assert paired["difference"]["mean"] == pytest.approx(0.625 - 0.25)
    assert paired["per_seed"] == {"0": pytest.approx(0.25), "1": pytest.approx(0.5)}
    assert paired["difference"]["low"] < 0.375 < paired["difference"]["high"]
    assert summary["wall_seconds"]["total"] == 36.0
    assert summary["seeds"] == summary["seeds_with_results"] == [0, 1]
    results = params.study.results
    assert json.loads(results.read_text()) == summary
    table = results.with_suffix(".md").read_text()
    assert "Protocol: **eto**" in table and "| step | 0.625" in table
    assert "| 10–11 |" in table  # trajectories per seed: their range
    assert "seeds with results: 0, 1 (of 0, 1)" in table
    assert "Paired difference step − golden" in table
    assert results.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_each_seed_writes_under_its_own_paths() -> None:
    params = load_params(REPO / "params.yaml")
    zero, one = (seed_overrides(params, s) for s in (0, 1))
    assert zero["seed"] == 0 and one["seed"] == 1
    assert zero["paths.models"] == str(Path("study") / "seed-0" / "models")
    assert {k for k in zero if k.startswith("paths.")} == {
        "paths.data",
        "paths.models",
        "paths.metrics",
        "paths.reports",
    }


def test_no_pair_is_reported_when_an_agent_has_no_results(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", {"evaluation.agents": ["base", "golden"]})
    runs = {0: load_params(REPO / "params.yaml", seed_overrides(params, 0))}
    summary = write_summary(params, runs)
    assert summary["agents"] == {} and summary["paired"] is None


def test_stage_time_survives_a_chunk_killed_in_the_stage(tmp_path: Path) -> None:
    """A chunk killed with SIGKILL in the middle of a stage keeps the time it ran (to within a
    heartbeat); the next chunk adds its own time to it; a stage that raises counts too."""
    import signal
    import subprocess
    import sys
    import time

    from stepflow.study.seeds import Timings

    path = tmp_path / "timings.json"
    launched = time.perf_counter()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from stepflow.study.seeds import Timings\n"
            "with Timings(Path(sys.argv[1]), heartbeat_s=0.1).running('train_step'):\n"
            "    print('running', flush=True)\n"
            "    time.sleep(60)\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "running\n"
    time.sleep(1.5)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    killed = Timings(path).seconds["train_step"]
    assert 1.0 <= killed <= time.perf_counter() - launched  # no longer than the child lived

    timings = Timings(path, heartbeat_s=0.1)
    began = time.perf_counter()
    with timings.running("train_step"):
        time.sleep(0.3)
    chunk = time.perf_counter() - began
    began = time.perf_counter()
    with pytest.raises(RuntimeError), timings.running("evaluate_step"):
        time.sleep(0.2)
        raise RuntimeError("the stage failed")
    failed = time.perf_counter() - began
    seconds = json.loads(path.read_text())
    assert killed + 0.3 <= seconds["train_step"] <= killed + chunk + 0.05  # 0.1 s rounding
    assert 0.2 <= seconds["evaluate_step"] <= failed + 0.05
