"""Episodes in shards: the split, the merge, and synthesis/evaluation on a real Dask
LocalCluster of 2 worker processes and on 2 threads against the default in-process runner;
episodes spread over two servers of one model listed in `base_url`."""

from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from pathlib import Path

import pytest

from stepflow.config import ConfigError, load_params
from stepflow.data.trajectory import TrajectoryLog, read_trajectories, write_trajectories
from stepflow.envs.base import TaskInstance
from stepflow.rollout.engine import RolloutSummary
from stepflow.rollout.shards import merge_shards, merged_teacher_stats, split_shards
from stepflow.teacher import TeacherStats
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
    killed = shard_dir / "shard-002.jsonl"  # a worker killed while writing its second record
    write_trajectories(killed, [make_trajectory(3)])
    with killed.open("a") as handle:
        handle.write(make_trajectory(4).model_dump_json()[:150])
    added = merge_shards(work_log, shard_dir)
    assert sorted(t.variation for t in added) == [1, 2, 3]
    assert sorted(t.variation for t in read_trajectories(work_log)) == [0, 1, 2, 3]
    assert list(shard_dir.iterdir()) == []  # merged shard files are removed
    assert merge_shards(work_log, shard_dir) == []


def test_teacher_stats_add_up() -> None:
    a = TeacherStats(calls=2, malformed=1, reasons={"wrong": 1})
    b = TeacherStats(calls=3, prompt_tokens=7, reasons={"wrong": 2, "loop": 1})
    total = merged_teacher_stats(
        [
            RolloutSummary(teacher="t", teacher_stats=a),
            RolloutSummary(),
            RolloutSummary(teacher="t", teacher_stats=b),
        ]
    )
    assert (total.calls, total.malformed, total.prompt_tokens) == (5, 1, 7)
    assert total.reasons == {"wrong": 3, "loop": 1}
    assert merged_teacher_stats([RolloutSummary()]) is None


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


def _processes(paths: list[Path]) -> set[tuple[str, str]]:
    """(pid, process name) of the processes that ran the episodes of these files."""
    extras = [t.provenance.extra for path in paths for t in read_trajectories(path)]
    assert extras and all(e["host"] == socket.gethostname() for e in extras)
    return {(e["pid"], e["process"]) for e in extras}


@pytest.fixture
def prefect_home(tmp_path: Path, monkeypatch) -> None:
    """A Prefect home of the test's own, as flows/ sets it (read when Prefect is first
    imported): a busy machine outlasts the ephemeral server's 20 s startup default."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _sharded_run(source: Path, workspace: Path, overrides: list[str], monkeypatch):
    """Enter a copy of `source` at `workspace`; its params with `overrides`, and their shard
    map (None: in this process)."""
    from tasks.scaleout import shard_map

    monkeypatch.chdir(_copy_workspace(source, workspace))
    params = load_params("params.yaml", overrides)
    return params, shard_map(params)


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
    base_agent_workspace: Path, tmp_path: Path, monkeypatch, prefect_home, one_torch_thread
) -> None:
    from stepflow.evaluate.evaluation import eval_paths, evaluate_agent
    from stepflow.teacher.synthesis import synthesize
    from tasks.scaleout import shard_map

    results = {}
    for name, overrides in (("default", SCALE), ("dask", [*SCALE, *DASK])):
        workspace = tmp_path / name
        params, shards = _sharded_run(base_agent_workspace, workspace, overrides, monkeypatch)
        assert (shards is None) == (name == "default")
        summary = synthesize(params, show_progress=False, shard_map=shards)
        metrics = evaluate_agent(params, "init_sft", "test", show_progress=False, shard_map=shards)
        work_logs = sorted(Path(".stepflow/work").glob("*/episodes.jsonl"))
        assert len(work_logs) == 2 and not list(Path(".stepflow/work").glob("*/shards/*"))
        for log in work_logs:  # one trajectory per instance, no duplicates
            keys = [t.key for t in read_trajectories(log)]
            assert len(keys) == len(set(keys))
        ran_in = _processes([eval_paths(params, "init_sft", "test")[0], *work_logs])
        if name == "default":
            assert ran_in == {(str(os.getpid()), "MainProcess")}
        else:  # every episode ran in a worker process of the cluster, none in this one
            assert ran_in and str(os.getpid()) not in {pid for pid, _ in ran_in}
            assert {process for _, process in ran_in} == {"Dask Worker process (from Nanny)"}
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


@pytest.mark.slow
def test_shards_on_threads_load_their_models_side_by_side(
    base_agent_workspace: Path, tmp_path: Path, monkeypatch, prefect_home, one_torch_thread
) -> None:
    """Two shards on Prefect's thread runner, each with its own copy of the agent in this
    process (loads are serialised: tests/test_llm_local.py): their episodes equal the
    in-process run's."""
    from stepflow.evaluate.evaluation import eval_paths, evaluate_agent

    threads = ["scaleout.task_runner=thread", "scaleout.workers=2"]
    episodes = {}
    for name, overrides in (("default", SCALE), ("threads", [*SCALE, *threads])):
        workspace = tmp_path / name
        params, shards = _sharded_run(base_agent_workspace, workspace, overrides, monkeypatch)
        assert (shards is None) == (name == "default")
        evaluate_agent(params, "init_sft", "test", show_progress=False, shard_map=shards)
        episodes[name] = _episodes(eval_paths(params, "init_sft", "test")[0])
    assert len(episodes["default"]) >= 2  # both shards had episodes
    assert episodes["threads"] == episodes["default"]


@pytest.mark.slow
def test_episodes_are_spread_over_the_listed_servers_each_on_one(
    tmp_path: Path, embedded_dir: Path, monkeypatch
) -> None:
    from stepflow.rollout.job import RolloutJob
    from tests.conftest import write_tiny_params
    from tests.servers import KEY, KEY_ENV, openai_servers, requests_seen

    monkeypatch.setenv(KEY_ENV, KEY)
    instances = [
        TaskInstance("scienceworld", "find-non-living-thing", v, "train") for v in (1, 2, 3)
    ]
    with openai_servers(2) as roots:
        # a long timeout: a retried request would be seen twice by its server
        endpoint = {"base_url": [f"{r}/v1" for r in roots], "timeout_s": 900}
        student = {
            "backend": "openai",
            "model": "embedded",
            "endpoint": {**endpoint, "model": "embedded", "api_key_env": KEY_ENV},
            "generation": {"max_new_tokens": 16},
        }
        # one episode at a time: a client that picked a server per request would move
        # every episode of more than one step to the other server
        overrides = {"student": student, "env.step_limit": 2, "rollout.concurrency": 1}
        write_tiny_params(tmp_path, overrides)
        params = load_params(tmp_path / "params.yaml")
        summary = RolloutJob(params, instances, tmp_path / "episodes.jsonl", progress=False).run()
        seen = {root: requests_seen(root) for root in roots}

    episodes = list(read_trajectories(tmp_path / "episodes.jsonl"))
    assert summary.episodes == 3 and summary.failed == 0
    instructions = {t.instruction: t for t in episodes}
    assert len(instructions) == 3  # each request names its episode by the task's instruction
    servers: dict[str, list[str]] = {t.key: [] for t in episodes}
    for root, requests in seen.items():
        for request in requests:
            assert request["status"] == 200
            text = "\n".join(m["content"] for m in request["messages"])
            (episode,) = [t for i, t in instructions.items() if i in text]
            servers[episode.key].append(root)
    for episode in episodes:
        used = servers[episode.key]
        assert len(used) == episode.stats.student_steps >= 1
        assert len(set(used)) == 1, f"{episode.key} used {set(used)}"
    assert any(len(used) >= 2 for used in servers.values())  # an episode of several requests
    # handed out in turn: both servers used
    assert sorted(Counter(used[0] for used in servers.values()).values()) == [1, 2]
