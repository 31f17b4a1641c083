"""Prefect for real: a `prefect server` of its own (home, database, port), the repository's
`prefect.yaml` deployed to a `process` work pool and run by a `prefect worker`, the evaluation
cache across flow runs (`tasks/caching.py`), `stepflow pipeline`, and a stage task retried by
Prefect after a transient fault (`tasks/retry.py`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from stepflow.tracking.ui import free_port
from tests.conftest import inside, write_tiny_params

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_checked(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output when it fails."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real `prefect server` on a free port, with its own PREFECT_HOME and SQLite database;
    yields the environment that points the CLI, workers and clients at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server not healthy after 300 s"
            time.sleep(0.5)
        yield env
    finally:
        _stop(proc)
        log.close()


def _client(env: dict[str, str]):
    """A synchronous Prefect client of the server in `env`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return get_client(sync_client=True)


def _task_runs(env: dict[str, str], flow_run_id: UUID) -> dict[str, list]:
    """The task runs of a flow run, by task name: [(task run, its state names in order)]."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: dict[str, list] = {}
    with _client(env) as client:
        for run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        ):
            states = sorted(client.read_task_run_states(run.id), key=lambda s: s.timestamp)
            runs.setdefault(run.name.rsplit("-", 1)[0], []).append((run, [s.name for s in states]))
    return runs


@pytest.mark.slow
def test_prefect_retries_a_stage_task_after_a_transient_fault(
    prefect_server, tmp_path, monkeypatch
) -> None:
    """The prepare flow (its real task, retry policy of tasks/retry.py) with a simulator crash
    injected into its first attempt: Prefect records AwaitingRetry → Retrying → Completed and
    the stage's outputs are written; a configuration error is failed at once, not retried."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import stepflow.data.prepare
    from flows.stages import prepare_flow
    from stepflow.envs.base import EnvCrashed

    real_prepare = stepflow.data.prepare.prepare
    calls: list[str] = []

    def crashing_once(params, **kwargs):
        calls.append("call")
        if len(calls) == 1:
            raise EnvCrashed("the ScienceWorld JVM died (injected)")
        return real_prepare(params, **kwargs)

    def misconfigured(params, **kwargs):
        calls.append("call")
        raise ValueError("splits.train_per_task: not a valid count (injected)")

    write_tiny_params(
        tmp_path,
        {"splits.train_per_task": 2, "splits.test_per_task": 1, "env.workers": 1},
    )
    with inside(tmp_path), temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        monkeypatch.setattr(stepflow.data.prepare, "prepare", misconfigured)
        failed = prepare_flow("params.yaml", return_state=True)
        monkeypatch.setattr(stepflow.data.prepare, "prepare", crashing_once)
        calls.clear()
        completed = prepare_flow("params.yaml", return_state=True)

    assert failed.is_failed()
    ((run, states),) = _task_runs(prefect_server, failed.state_details.flow_run_id)["prepare"]
    assert run.run_count == 1 and "AwaitingRetry" not in states and states[-1] == "Failed"

    assert completed.is_completed(), completed
    ((run, states),) = _task_runs(prefect_server, completed.state_details.flow_run_id)["prepare"]
    assert run.run_count == 2, states
    retry = states.index("AwaitingRetry")
    assert states[retry:] == ["AwaitingRetry", "Retrying", "Completed"], states
    assert len(calls) == 2
    golden = (tmp_path / "data" / "golden_d1.jsonl").read_text().splitlines()
    assert golden and (tmp_path / "data" / "manifest.json").is_file()


# A whole pipeline as small as it goes: one task type, one U1, one U2 and one test instance,
# one training step per variant, the base agent and STeP evaluated.
PIPELINE = {
    "env.task_types": ["find-non-living-thing"],
    "env.step_limit": 4,
    "env.workers": 1,
    "splits.train_per_task": 2,
    "splits.test_per_task": 1,
    "student.generation.max_new_tokens": 32,
    "rollout.concurrency": 1,
    "training.max_steps": 1,
    "training.max_seq_len": 1024,
    "training.save_steps": 100,
    "evaluation.agents": ["base", "step"],
    "evaluation.bootstrap_samples": 50,
}


def _flow_runs(env: dict[str, str]) -> list[tuple[str, object]]:
    """Every flow run on the server, oldest first: (flow name, flow run)."""
    with _client(env) as client:
        runs = client.read_flow_runs()
        names = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
    return sorted(((names[r.flow_id], r) for r in runs), key=lambda pair: pair[1].created)


def _outputs(root: Path) -> dict[str, int]:
    """Modification times (ns) of every file under the stages' output directories."""
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for name in ("data", "models", "metrics", "reports")
        for path in (root / name).rglob("*")
        if path.is_file()
    }


@pytest.mark.slow
def test_stepflow_pipeline_then_a_deployment_of_prefect_yaml_served_from_the_cache(
    prefect_server, tmp_path
) -> None:
    """`prefect deploy --all` of the repository's prefect.yaml (pull step: STEPFLOW_HOME),
    `stepflow pipeline` reporting to the server, then the `evaluate` deployment with the same
    overrides run by a `prefect worker`, base's outputs made stale first: Completed, STeP's
    evaluation a cache hit of the pipeline's (tasks/caching.py) with nothing rewritten, base's
    evaluated again."""
    import json

    import yaml

    from stepflow.config import parse_overrides

    home = tmp_path / "home"  # the repository root of a user: code, params.yaml, outputs
    for name in ("stepflow", "flows", "tasks"):
        shutil.copytree(REPO / name, home / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "params.yaml", home / "params.yaml")
    # the CLI, `prefect deploy` and the worker's flow runs all import the code under `home`
    env = {**prefect_server, "PYTHONPATH": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pool = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert len(pool) == 1, pool
    (pool,) = pool
    run_checked(["prefect", "work-pool", "create", pool, "--type", "process"], home, env)
    run_checked(
        ["prefect", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml")],
        home,
        {**env, "STEPFLOW_HOME": str(home)},
    )
    with _client(env) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        flows = {d.name: client.read_flow(d.flow_id).name for d in deployments.values()}
    assert set(deployments) == {d["name"] for d in spec["deployments"]}
    for entry in spec["deployments"]:
        deployment = deployments[entry["name"]]
        assert deployment.entrypoint == entry["entrypoint"]
        assert deployment.work_pool_name == pool
        assert deployment.parameters == entry["parameters"]
        pulled = json.dumps(deployment.pull_steps)
        assert str(home) in pulled and "{{" not in pulled, pulled  # resolved at deploy time
    assert flows["step-pipeline"] == "step_pipeline"

    with _client(env) as client:
        earlier = {run.id for run in client.read_flow_runs()}  # of the other tests
    sets = [f"{key}={json.dumps(value)}" for key, value in PIPELINE.items()]
    assert parse_overrides(sets) == PIPELINE
    pipeline = run_checked(
        ["stepflow", "pipeline", *(arg for s in sets for arg in ("-S", s))], home, env
    )
    assert "STeP" in pipeline.stdout and "base model" in pipeline.stdout, pipeline.stdout
    runs = [(name, run) for name, run in _flow_runs(env) if run.id not in earlier]
    assert [name for name, _ in runs] == [
        "step_pipeline",
        "prepare",
        "train",
        "synthesize",
        "train",
        "train",
        "train",
        "evaluate",
        "report",
    ]
    assert all(run.state.is_completed() for _, run in runs), [r.state for _, r in runs]
    (evaluate_run,) = [run for name, run in runs if name == "evaluate"]
    evaluations = _task_runs(env, evaluate_run.id)["evaluate"]
    assert len(evaluations) == 2 and all(states[-1] == "Completed" for _, states in evaluations)
    manifest = json.loads((home / "data" / "manifest.json").read_text())
    assert sorted(i["split"] for i in manifest["instances"]) == ["test", "u1", "u2"]
    for agent in ("base", "step"):
        assert json.loads((home / "metrics" / f"{agent}.json").read_text())
    for variant in ("init_sft", "golden", "step", "step_nomask"):
        assert (home / "models" / variant / "adapter_model.safetensors").is_file()
    results = (home / "reports" / "results.md").read_text()
    assert "base model" in results and "STeP" in results
    # base's evaluation made stale (its metrics file lost): evaluated again, STeP's cached
    (home / "metrics" / "base.json").unlink()
    before = _outputs(home)

    worker_dir = tmp_path / "worker"  # the pull step, not the worker's directory, decides
    worker_dir.mkdir()
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", pool],
        cwd=worker_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        (name,) = [d["name"] for d in spec["deployments"] if flows[d["name"]] == "evaluate"]
        started = run_checked(
            [
                "prefect",
                "deployment",
                "run",
                f"evaluate/{name}",
                "-p",
                f"overrides={json.dumps(PIPELINE)}",
                "--watch",
                "--watch-timeout",
                "1500",
            ],
            home,
            env,
        )
    finally:
        _stop(worker)
        log.close()
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1))
    with _client(env) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.is_completed(), flow_run.state
    assert flow_run.parameters["overrides"] == PIPELINE
    evaluations = sorted(
        _task_runs(env, flow_run_id)["evaluate"], key=lambda e: e[0].expected_start_time
    )
    assert [states[-1] for _, states in evaluations] == ["Completed", "Cached"], evaluations
    after = _outputs(home)
    assert json.loads((home / "metrics" / "base.json").read_text())
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    assert changed and all("base" in path for path in changed), changed  # none of STeP's
    assert (home / "mlruns").is_dir() and not (worker_dir / "mlruns").exists()
