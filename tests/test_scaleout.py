"""Episodes in shards: the split, the merge, and synthesis/evaluation on a real Dask
LocalCluster of 2 worker processes against the default in-process runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stepflow.config import ConfigError, load_params
from stepflow.envs.base import TaskInstance
from stepflow.rollout import RolloutSummary
from stepflow.shards import ShardResult, merge_shards, merged_teacher_stats, split_shards
from stepflow.teacher import TeacherStats
from stepflow.trajectory import TrajectoryLog, read_trajectories, write_trajectories
from tests.test_trajectory_io import make_trajectory

# greedy, one episode at a time per worker: batching pads prompts, which may change logits
SCALE = ["rollout.concurrency=1", "env.step_limit=6"]
DASK = ["scaleout.task_runner=dask", "scaleout.workers=2"]


def test_split_is_deterministic_balanced_and_complete() -> None:
    instances = [TaskInstance("scienceworld", t, v, "test") for t in "ab" for v in range(5)]
    shards = split_shards(list(reversed(instances)), 3)
    assert shards == split_shards(instances, 3)
    assert sorted(i.key for s in shards for i in s) == sorted(i.key for i in instances)
    assert [len(s) for s in shards] == [4, 3, 3]
    assert split_shards(instances[:2], 4) == [[instances[0]], [instances[1]]]
    with pytest.raises(ValueError, match="positive"):
        split_shards(instances, 0)


def test_merge_appends_each_instance_once(tmp_path: Path) -> None:
    work_log = tmp_path / "episodes.jsonl"
    with TrajectoryLog(work_log) as log:
        log.append(make_trajectory(0))
    shard_dir = tmp_path / "shards"
    write_trajectories(shard_dir / "shard-000.jsonl", [make_trajectory(0), make_trajectory(1)])
    write_trajectories(shard_dir / "shard-001.jsonl", [make_trajectory(2), make_trajectory(1)])
    added = merge_shards(work_log, shard_dir)
    assert sorted(t.variation for t in added) == [1, 2]
    assert sorted(t.variation for t in read_trajectories(work_log)) == [0, 1, 2]
    assert list(shard_dir.iterdir()) == []  # merged shard files are removed
    assert merge_shards(work_log, shard_dir) == []


def test_teacher_stats_add_up() -> None:
    a = TeacherStats(calls=2, malformed=1, reasons={"wrong": 1})
    b = TeacherStats(calls=3, prompt_tokens=7, reasons={"wrong": 2, "loop": 1})
    total = merged_teacher_stats(
        [
            ShardResult(RolloutSummary(), "t", a),
            ShardResult(RolloutSummary()),
            ShardResult(RolloutSummary(), "t", b),
        ]
    )
    assert (total.calls, total.malformed, total.prompt_tokens) == (5, 1, 7)
    assert total.reasons == {"wrong": 3, "loop": 1}
    assert merged_teacher_stats([ShardResult(RolloutSummary())]) is None


def test_scaleout_and_endpoint_settings(params_file: Path) -> None:
    params = load_params(params_file)
    assert not params.scaleout.fans_out  # default: in process, as before
    dask = load_params(params_file, [*DASK])
    assert dask.scaleout.fans_out and dask.scaleout.shard_count == 2
    threads = load_params(params_file, ["scaleout.shards=3"])
    assert threads.scaleout.fans_out and threads.scaleout.shard_count == 3
    with pytest.raises(ConfigError, match="address needs task_runner dask or ray"):
        load_params(params_file, ["scaleout.address=tcp://host:8786"])
    urls = "{model: m, base_url: [http://a/v1, http://b/v1]}"
    served = load_params(params_file, ["student.backend=openai", f"student.endpoint={urls}"])
    assert served.student.endpoint.urls == ["http://a/v1", "http://b/v1"]
    with pytest.raises(ConfigError, match="base_url"):
        load_params(
            params_file, ["student.backend=openai", "student.endpoint={model: m, base_url: []}"]
        )


def _copy_workspace(source: Path, target: Path) -> Path:
    """The prepared data, adapter and params of a workspace (no work logs)."""
    target.mkdir()
    shutil.copy(source / "params.yaml", target / "params.yaml")
    shutil.copytree(source / "data", target / "data", ignore=shutil.ignore_patterns("eval"))
    shutil.copytree(source / "models", target / "models")
    return target


def _episodes(path: Path) -> dict[str, tuple]:
    """Per instance: the executed turns (role, kind, content, action), reward and score."""
    episodes = {}
    for t in read_trajectories(path):
        turns = tuple((u.role, u.kind, u.content, u.action, u.loss) for u in t.turns)
        episodes[t.key] = (turns, t.reward, t.score, t.num_steps)
    return episodes


@pytest.fixture
def one_torch_thread():
    """Decode on one thread in this process too, as every Dask worker does
    (OMP_NUM_THREADS=1): float sums in another order can flip a greedy token."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_dask_cluster_gives_the_default_runners_episodes(
    base_agent_workspace: Path, tmp_path: Path, monkeypatch, one_torch_thread
) -> None:
    from stepflow.evaluation import eval_paths, evaluate_agent
    from stepflow.synthesize import synthesize
    from tasks.scaleout import shard_map

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    results = {}
    for name, overrides in (("default", SCALE), ("dask", [*SCALE, *DASK])):
        workspace = _copy_workspace(base_agent_workspace, tmp_path / name)
        monkeypatch.chdir(workspace)
        params = load_params("params.yaml", overrides)
        shards = shard_map(params)
        assert (shards is None) == (name == "default")
        summary = synthesize(params, show_progress=False, shard_map=shards)
        metrics = evaluate_agent(params, "init_sft", "test", show_progress=False, shard_map=shards)
        work_logs = sorted(Path(".stepflow/work").glob("*/episodes.jsonl"))
        assert len(work_logs) == 2 and not list(Path(".stepflow/work").glob("*/shards/*"))
        for log in work_logs:  # one trajectory per instance, no duplicates
            keys = [t.key for t in read_trajectories(log)]
            assert len(keys) == len(set(keys))
        results[name] = {
            "reflected": _episodes(workspace / "data/reflected.jsonl"),
            "synthesis": {log.parent.name.split("-")[0]: _episodes(log) for log in work_logs},
            "evaluation": _episodes(eval_paths(params, "init_sft", "test")[0]),
            "summary": (summary.episodes, summary.kept, summary.teacher, summary.teacher_calls),
            "reward": metrics.overall.reward.mean,
        }
    default, dask = results["default"], results["dask"]
    assert default["synthesis"]["synthesize"]  # episodes were run
    assert dask == default
    # a rerun on the cluster resumes: everything is done, nothing is rerun
    again = synthesize(params, show_progress=False, shard_map=shard_map(params))
    assert again.resumed == again.episodes == default["summary"][0]
