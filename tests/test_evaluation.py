"""Evaluation metrics, the evaluate stage on real ScienceWorld, the report, run comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from stepflow.config import load_params
from stepflow.data.splits import load_manifest
from stepflow.data.trajectory import EpisodeStats, read_trajectories
from stepflow.evaluate.evaluation import (
    current_evaluation,
    eval_paths,
    evaluate_agent,
    write_dvc_metrics,
)
from stepflow.evaluate.metrics import agent_metrics, bootstrap_interval
from stepflow.evaluate.report import build_report
from tests.test_trajectory_io import make_trajectory


def _episode(task: str, variation: int, reward: float, parse_failures: int = 0):
    t = make_trajectory(variation, steps=2)
    return t.model_copy(
        update={
            "task_type": task,
            "reward": reward,
            "success": reward == 1.0,
            "stats": EpisodeStats(parse_failures=parse_failures, invalid_actions=1),
        }
    )


def test_metrics_overall_and_per_task() -> None:
    episodes = [_episode("a", 0, 1.0), _episode("a", 1, 0.5, 1), _episode("b", 2, 0.0, 2)]
    metrics = agent_metrics("x", "test", episodes, samples=500, seed=1)
    assert metrics.overall.episodes == 3 and metrics.overall.steps == 6
    assert metrics.overall.reward.mean == pytest.approx(0.5)
    assert metrics.overall.success.mean == pytest.approx(1 / 3)
    assert metrics.overall.parse_failure_rate == pytest.approx(3 / 6)
    assert metrics.overall.invalid_action_rate == pytest.approx(3 / 6)
    assert metrics.per_task["a"].reward.mean == pytest.approx(0.75)
    assert metrics.per_task["b"].success.mean == 0.0
    flat = metrics.flat()
    assert flat["reward/a"] == pytest.approx(0.75) and flat["episodes/b"] == 1


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0, 1, 1, 0, 1, 0.5, 0.25, 1]
    a = bootstrap_interval(values, 2000, 0.95, seed=3)
    b = bootstrap_interval(values, 2000, 0.95, seed=3)
    assert a == b
    assert a.low <= a.mean <= a.high and a.low < a.high
    narrow = bootstrap_interval(values, 2000, 0.5, seed=3)
    assert a.low <= narrow.low and narrow.high <= a.high
    constant = bootstrap_interval([1, 1, 1], 100, 0.95, seed=0)
    assert (constant.low, constant.mean, constant.high) == (1, 1, 1)


@pytest.mark.slow
def test_evaluate_agents_on_the_same_instances(base_agent_workspace, monkeypatch) -> None:
    monkeypatch.chdir(base_agent_workspace)
    params = load_params("params.yaml", ["env.step_limit=5", "evaluation.agents=[base, init_sft]"])
    results = {}
    for agent in ("base", "init_sft"):
        results[agent] = evaluate_agent(params, agent, "test", show_progress=False)
        write_dvc_metrics(params, agent, {"test": results[agent]})
    assert results["base"].instances == results["init_sft"].instances
    test_keys = sorted(i.key for i in load_manifest("data/manifest.json").select("test"))
    assert results["base"].instances == test_keys
    for agent, metrics in results.items():
        trajectories_path, metrics_path = eval_paths(params, agent, "test")
        stored = list(read_trajectories(trajectories_path))
        assert sorted(t.key for t in stored) == metrics.instances
        # recomputed independently from the stored trajectories
        rewards = [t.reward for t in stored]
        assert metrics.overall.reward.mean == pytest.approx(sum(rewards) / len(rewards))
        assert metrics.overall.success.mean == pytest.approx(
            sum(t.success for t in stored) / len(stored)
        )
        steps = sum(t.num_steps for t in stored)
        assert metrics.overall.parse_failure_rate == pytest.approx(
            sum(t.stats.parse_failures for t in stored) / steps
        )
        assert all(t.num_steps <= 5 and t.provenance.source == "evaluation" for t in stored)
        dvc = json.loads(Path(f"metrics/{agent}.json").read_text())
        assert dvc["test"]["reward"] == pytest.approx(metrics.overall.reward.mean)
        assert json.loads(metrics_path.read_text())["agent"] == agent
        assert current_evaluation(params, agent) is not None
    base = list(read_trajectories(eval_paths(params, "base", "test")[0]))
    sft = list(read_trajectories(eval_paths(params, "init_sft", "test")[0]))
    assert base[0].provenance.student_model == "embedded"
    assert sft[0].provenance.student_model == "embedded+init_sft"

    report = build_report(params)
    assert "| base model (untrained) |" in report.markdown
    assert "| base agent (SFT on D1) |" in report.markdown
    assert all(path.is_file() and path.stat().st_size > 0 for path in report.files)
    csv_rows = Path("reports/per_task.csv").read_text().splitlines()
    assert csv_rows[0] == "split,agent,task,reward,success,episodes"
    assert len(csv_rows) == 1 + 2 * 2  # two agents × (overall + one task type)
    assert Path("reports/success_by_task_test.png").read_bytes()[:4] == b"\x89PNG"

    # a different adapter makes the stored evaluation stale
    stale = load_params("params.yaml", ["env.step_limit=6", "evaluation.agents=[base]"])
    assert current_evaluation(stale, "base") is None


def test_report_refuses_missing_agents(tmp_path, params_file, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = load_params(params_file)
    first = params.evaluation.agents[0]
    with pytest.raises(FileNotFoundError, match=f"no evaluation of {first}"):
        build_report(params)


def test_compare_two_runs(tmp_path, params_file, monkeypatch) -> None:
    from stepflow import tracking

    monkeypatch.chdir(tmp_path)
    params = load_params(params_file)
    ids = []
    for value in (0.25, 0.75):
        with tracking.stage_run(params, "evaluate_step") as run:
            tracking.log_metrics({"test/reward": value, "test/success": value / 2})
            ids.append(run.info.run_id)
    tracking.end_pipeline_run(params)
    result = CliRunner().invoke(app, ["compare", *ids, "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "test/reward" in line)
    assert "0.25" in line and "0.75" in line and "+0.5" in line
    missing = CliRunner().invoke(
        app, ["compare", ids[0], "no-such-run", "--params", str(params_file)]
    )
    assert missing.exit_code == 2 and "no-such-run" in missing.output
