"""Faults a real run meets, each injected on purpose: a misbehaving LLM endpoint (a real local
HTTP server), SIGKILL during synthesis and training, bad input, secrets, concurrent runs.

The JVM killed mid-episode is in tests/test_rollout_engine.py; the SIGKILL of prepare in
tests/test_prepare.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from stepflow.config import PathsConfig, load_params, set_by_path
from stepflow.data.trajectory import read_trajectories
from stepflow.evaluate.evaluation import eval_paths, evaluate_agent
from stepflow.evaluate.report import markdown_table
from stepflow.locking import outputs_lock
from stepflow.rollout.engine import EpisodeErrors
from stepflow.teacher.synthesis import synthesize
from stepflow.train.runs import last_checkpoint
from tests.servers import KEY, KEY_ENV, clear_faults, free_port, inject, openai_server

CLI = [sys.executable, "-m", "flows.cli"]
FLOWS = [sys.executable, "-m", "flows"]


@pytest.fixture(scope="module")
def server(embedded_dir):
    """A live OpenAI-compatible server over the embedded model that misbehaves on demand."""
    with openai_server() as root:
        yield root


@pytest.fixture
def workspace(base_agent_workspace: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the tiny workspace (prepared data + base agent), as the cwd."""
    target = tmp_path / "ws"
    shutil.copytree(
        base_agent_workspace, target, ignore=shutil.ignore_patterns("mlruns", "work", "eval")
    )
    for name in ("reflected.jsonl", "synthesis_stats.json"):
        (target / "data" / name).unlink(missing_ok=True)
    monkeypatch.chdir(target)
    return target


def edit_params(path: Path, changes: dict) -> None:
    """Set dotted keys of a params file."""
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        set_by_path(data, key, value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def served_student(root: str, **endpoint) -> dict:
    """An evaluation.llm section pointing at the test server."""
    settings = {"base_url": f"{root}/v1", "model": "embedded", "api_key_env": KEY_ENV}
    return {
        "backend": "openai",
        "model": "embedded",
        "endpoint": {**settings, **endpoint},
        "generation": {"max_new_tokens": 40},
    }


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen, what: str, limit: float
) -> None:
    """Poll `condition` until true; fail when the process ends first or time runs out."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its children."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a stage process: this one's, without the MLflow store an earlier
    test pointed the process at (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **extra}


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


# -- the LLM endpoint --------------------------------------------------------------------


@pytest.mark.slow
def test_endpoint_faults_fail_one_episode_and_the_evaluation_goes_on(
    workspace: Path, server: str, monkeypatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    overrides = {
        "evaluation.llm": served_student(server, max_retries=3),
        "rollout.concurrency": 1,
        "env.step_limit": 3,
    }
    params = load_params("params.yaml", overrides)
    clear_faults(server)
    # the first episode's first request meets 4 faults in a row (more than max_retries=3)
    for fault in ({"status": 429}, {"status": 500}, {"body": "non_json"}, {"body": "cut"}):
        inject(server, **fault)
    # the second episode's first request: a truncated document, a 503, then an answer
    # (timeouts: tests/test_llm_endpoint.py, with a short prompt that answers in time)
    inject(server, body="truncated_json")
    inject(server, status=503)
    metrics = evaluate_agent(params, "base", "test", show_progress=False)

    path, _ = eval_paths(params, "base", "test")
    first, second = read_trajectories(path)
    assert first.failure is not None and "after 4 attempts" in first.failure
    assert first.num_steps == 0 and not first.success
    assert second.failure is None and second.num_steps == 3
    assert metrics.overall.failed_episodes == 1 and metrics.overall.episodes == 2
    assert metrics.flat()["failed_episodes"] == 1.0
    assert "| 2 (1 failed) |" in markdown_table({"base": metrics}, "test", params)

    # a rerun retries the failed episode only; the file never holds two records of one
    again = evaluate_agent(params, "base", "test", show_progress=False)
    retried, kept = read_trajectories(path)
    assert again.overall.failed_episodes == 0
    assert retried.failure is None and retried.num_steps == 3
    assert kept == second  # not run again
    (work_log,) = Path(".stepflow/work").glob("evaluate-base-test-*/episodes.jsonl")
    keys = [t.key for t in read_trajectories(work_log)]
    assert sorted(keys) == sorted({first.key, second.key})


@pytest.mark.slow
def test_unreachable_teacher_fails_episodes_and_the_stage_reports_them(workspace: Path) -> None:
    dead = {
        "backend": "openai",
        "model": "teacher",
        "endpoint": {
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "model": "teacher",
            "api_key_env": None,
            "max_retries": 1,
        },
    }
    # no server to ask for its context length: the budget is given
    overrides = {
        "teacher.kind": "llm",
        "teacher.llm": dead,
        "teacher.max_context_tokens": 8192,
        "env.step_limit": 4,
    }
    tolerant = load_params("params.yaml", {**overrides, "rollout.max_failed_fraction": 1.0})
    summary = synthesize(tolerant, show_progress=False)
    assert summary.episodes == summary.failed == 3 and summary.kept == 0
    assert all("APIConnectionError" in cause for cause in summary.failures.values())
    stats = json.loads(Path("data/synthesis_stats.json").read_text())
    assert stats["failed"] == 3 and len(stats["failures"]) == 3
    assert list(read_trajectories("data/reflected.jsonl")) == []

    strict = load_params("params.yaml", overrides)
    Path("data/reflected.jsonl").unlink()
    with pytest.raises(EpisodeErrors, match="3 of 3 episodes failed"):
        synthesize(strict, show_progress=False)
    assert not Path("data/reflected.jsonl").exists()


# -- SIGKILL -------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_synthesis_resumes_without_duplicates(workspace: Path) -> None:
    args = [*CLI, "synthesize", "-p", "params.yaml", "-S", "env.step_limit=6"]
    proc = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    logs = lambda: list(Path(".stepflow/work").glob("synthesize-*/episodes.jsonl"))  # noqa: E731
    wait_for(lambda: bool(logs()) and lines(logs()[0]) >= 1, proc, "the first episode", 600)
    kill(proc)
    (work_log,) = logs()
    landed = work_log.read_text()
    done = landed.count("\n")
    assert 1 <= done < 3
    assert not Path("data/reflected.jsonl").exists()  # no half-written output

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert work_log.read_text().startswith(landed)  # finished episodes kept as they were
    keys = [t.key for t in read_trajectories(work_log)]
    assert len(keys) == 3 and len(set(keys)) == 3
    stats = json.loads(Path("data/synthesis_stats.json").read_text())
    assert (stats["resumed"], stats["episodes"]) == (done, 3)
    reflected = [t.key for t in read_trajectories("data/reflected.jsonl")]
    assert len(reflected) == stats["kept"] and len(set(reflected)) == len(reflected)


@pytest.mark.slow
def test_killed_evaluation_resumes_without_running_finished_episodes_again(
    workspace: Path,
) -> None:
    args = [*CLI, "evaluate", "init_sft", "-p", "params.yaml"]
    args += ["-S", "rollout.concurrency=1", "-S", "env.step_limit=6"]
    proc = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    logs = lambda: list(Path(".stepflow/work").glob("evaluate-init_sft-test-*/episodes.jsonl"))  # noqa: E731
    wait_for(lambda: bool(logs()) and lines(logs()[0]) >= 1, proc, "the first episode", 600)
    kill(proc)
    (work_log,) = logs()
    landed = work_log.read_text()
    (finished,) = read_trajectories(work_log)  # one of the two test instances
    params = load_params("params.yaml")
    output, metrics_file = eval_paths(params, "init_sft", "test")
    assert not output.exists() and not metrics_file.exists()  # nothing half-written

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the finished episode is kept as it was and not run again: one new record only
    assert work_log.read_text().startswith(landed)
    keys = [t.key for t in read_trajectories(work_log)]
    assert len(keys) == 2 and len(set(keys)) == 2
    evaluated = {t.key: t for t in read_trajectories(output)}
    assert sorted(evaluated) == sorted(keys) and evaluated[finished.key] == finished
    metrics = json.loads(metrics_file.read_text())
    assert metrics["overall"]["episodes"] == 2 and sorted(metrics["instances"]) == sorted(keys)
    assert metrics["overall"]["steps"] == sum(t.num_steps for t in evaluated.values())
    assert json.loads(Path("metrics/init_sft.json").read_text())["test"]["episodes"] == 2


@pytest.mark.slow
def test_killed_sharded_synthesis_resumes_without_duplicates(
    workspace: Path, tmp_path: Path
) -> None:
    # two shards on a one-process pool: the shards run one after the other
    args = [*CLI, "synthesize", "-p", "params.yaml", "-S", "env.step_limit=6"]
    args += ["-S", "scaleout.task_runner=process", "-S", "scaleout.workers=1"]
    args += ["-S", "scaleout.shards=2"]
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    shards = lambda: sorted(Path(".stepflow/work").glob("synthesize-*/shards/shard-*.jsonl"))  # noqa: E731
    wait_for(lambda: sum(lines(p) for p in shards()) >= 1, proc, "the first episode", 600)
    kill(proc)
    landed = {p: p.read_text() for p in shards()}
    done = sum(text.count("\n") for text in landed.values())
    assert 1 <= done < 3
    assert not Path("data/reflected.jsonl").exists()  # no half-written output
    # killed in the middle of writing a record: a shard file ends in an unfinished line
    written = next(p for p, text in landed.items() if text)
    with written.open("a") as handle:
        handle.write(landed[written].splitlines()[0][:200])

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (work_log,) = Path(".stepflow/work").glob("synthesize-*/episodes.jsonl")
    merged = work_log.read_text()
    for text in landed.values():  # finished episodes kept as they were, not run again
        assert all(line in merged.splitlines() for line in text.splitlines())
    keys = [t.key for t in read_trajectories(work_log)]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert not shards()  # every shard file merged
    stats = json.loads(Path("data/synthesis_stats.json").read_text())
    assert (stats["resumed"], stats["episodes"]) == (done, 3)
    reflected = [t.key for t in read_trajectories("data/reflected.jsonl")]
    assert len(reflected) == stats["kept"] and len(set(reflected)) == len(reflected)


@pytest.mark.slow
def test_killed_training_resumes_from_the_last_checkpoint(workspace: Path) -> None:
    args = [*CLI, "train", "golden", "-p", "params.yaml"]
    args += ["-S", "training.max_steps=6", "-S", "training.save_steps=2"]
    proc = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def complete() -> Path | None:
        found = [
            last_checkpoint(d) for d in Path(".stepflow/work").glob("train-golden-*/checkpoints")
        ]
        return next((c for c in found if c is not None), None)

    wait_for(lambda: complete() is not None, proc, "the first checkpoint", 600)
    kill(proc)
    assert not Path("models/golden").exists()  # no half-written adapter
    resumed = complete()
    saved = int(resumed.name.rsplit("-", 1)[1])
    before = json.loads((resumed / "trainer_state.json").read_text())["log_history"]

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from checkpoint-{saved}" in " ".join((rerun.stdout + rerun.stderr).split())
    card = json.loads(Path("models/golden/stepflow.json").read_text())
    assert card["global_step"] == 6 and card["resumed_from"] == f"checkpoint-{saved}"
    assert [step for step, _ in card["losses"]] == [1, 2, 3, 4, 5, 6]  # none twice, none lost
    head = [[e["step"], e["loss"]] for e in before if "loss" in e]
    assert card["losses"][: len(head)] == head


# -- bad input -----------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    result.text = " ".join((result.stdout + result.stderr).split())  # rich wraps lines
    return result


def test_malformed_params_name_file_and_line(tmp_path: Path, params_file: Path) -> None:
    broken = tmp_path / "broken.yaml"
    text = params_file.read_text().replace("  r: 16", "  r: sixteen")
    broken.write_text(text)
    line = text.splitlines().index("    r: sixteen") + 1
    result = run_cli("config", "check", "-p", str(broken))
    assert result.returncode == 2
    assert f"broken.yaml:{line}: training.lora.r" in result.text
    bad_yaml = tmp_path / "bad_yaml.yaml"
    bad_yaml.write_text("env:\n  name: scienceworld\n task_types: [a]\n")
    result = run_cli("config", "check", "-p", str(bad_yaml))
    assert result.returncode == 2 and "bad_yaml.yaml" in result.text and "line 3" in result.text


@pytest.mark.slow
def test_bad_input_is_refused_and_writes_nothing(workspace: Path, tmp_path: Path) -> None:
    # a corrupt line in a trajectory file
    golden = Path("data/golden_d1.jsonl")
    rows = golden.read_text().splitlines(keepends=True)
    golden.write_text(rows[0] + rows[1][: len(rows[1]) // 2] + "\n" + "".join(rows[2:]))
    result = run_cli("train", "golden", "-p", "params.yaml", "--out-dir", "models/fresh")
    assert result.returncode == 2 and "golden_d1.jsonl:2: invalid record" in result.text
    assert not Path("models/fresh").exists()
    golden.write_text("".join(rows))

    # a model path that does not exist
    result = run_cli("evaluate", "base", "-p", "params.yaml", "-S", "student.model=/no/such/model")
    assert result.returncode == 2 and "/no/such/model" in result.text
    assert not eval_paths(load_params("params.yaml"), "base", "test")[0].exists()

    # an empty split
    result = run_cli("evaluate", "base", "-p", "params.yaml", "-S", "evaluation.splits=[dev]")
    assert result.returncode == 2 and "split 'dev'" in result.text and "no instances" in result.text
    assert not Path("data/eval/base/dev.jsonl").exists()

    # an adapter trained for another base model
    other_base = tmp_path / "other-base"
    foreign_adapter(other_base, Path("models/init_sft"))
    result = run_cli("evaluate", "init_sft", "-p", "params.yaml")
    assert result.returncode == 2 and "models/init_sft" in result.text
    assert str(other_base) in result.text
    assert not Path("data/eval/init_sft").exists()


def foreign_adapter(base_dir: Path, adapter_dir: Path) -> None:
    """Replace `adapter_dir` with a LoRA adapter of a tiny llama built from a config."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).save_pretrained(base_dir)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    shutil.rmtree(adapter_dir)
    model.save_pretrained(adapter_dir)


# -- secrets -------------------------------------------------------------------------------


@pytest.mark.slow
def test_api_key_is_never_stored(workspace: Path, server: str, tmp_path: Path) -> None:
    edit_params(
        Path("params.yaml"),
        {"evaluation.llm": served_student(server, max_retries=2), "env.step_limit": 2},
    )
    clear_faults(server)
    inject(server, status=503)  # a retry is logged too
    env = child_env(**{KEY_ENV: KEY, "PREFECT_HOME": str(tmp_path / "prefect")})
    result = subprocess.run(
        [*FLOWS, "evaluate", "base"], capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stored = json.loads(Path("metrics/base.json").read_text())
    assert stored["test"]["episodes"] == 2  # the run did use the keyed endpoint

    assert KEY not in result.stdout + result.stderr
    searched = 0
    for root in (Path("mlruns"), Path("data"), Path(".stepflow"), Path("metrics"), tmp_path):
        for path in root.rglob("*"):
            if path.is_file():
                searched += 1
                assert KEY.encode() not in path.read_bytes(), f"API key found in {path}"
    assert searched > 10 and any(Path("mlruns").rglob("mlflow.db"))


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_runs_keep_their_own_outputs(tmp_path: Path, params_file: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    tiny = {
        "splits.train_per_task": 2,
        "splits.test_per_task": 1,
        "env.workers": 1,
        "agent.one_shot": False,
    }
    runs = {"a": "find-non-living-thing", "b": "lifespan-longest-lived"}
    for name, task in runs.items():
        target = root / f"{name}.yaml"
        shutil.copy(params_file, target)
        paths = {f"paths.{p}": f"runs/{name}/{p}" for p in ("data", "models", "metrics", "reports")}
        edit_params(target, {**tiny, **paths, "env.task_types": [task]})
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"))

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*FLOWS, "prepare", "-p", f"{name}.yaml"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    first, second = start("a"), start("b")
    outputs = [proc.communicate(timeout=900)[0] for proc in (first, second)]
    assert first.returncode == 0, outputs[0][-3000:]
    assert second.returncode == 0, outputs[1][-3000:]

    # a run writing run a's outputs while another process holds them is refused
    held = PathsConfig(
        **{p: root / f"runs/a/{p}" for p in ("data", "models", "metrics", "reports")}
    )
    with outputs_lock(held, "report"):
        clash = subprocess.run(
            [*CLI, "prepare", "-p", "a.yaml", "-S", "env.task_types=[lifespan-shortest-lived]"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert clash.returncode == 2
    message = " ".join((clash.stdout + clash.stderr).split())
    assert "being written by another run" in message and f"pid {os.getpid()}" in message

    for name, task in runs.items():
        manifest = json.loads((root / f"runs/{name}/data/manifest.json").read_text())
        assert json.dumps(manifest).count(task) >= 3
        other = runs["b" if name == "a" else "a"]
        assert other not in json.dumps(manifest) and "lifespan-shortest" not in json.dumps(manifest)
        golden = list(read_trajectories(root / f"runs/{name}/data/golden_d1.jsonl"))
        assert golden and all(t.task_type == task for t in golden)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "stepflow"]
    stages = client.search_runs([experiment.experiment_id], "tags.`stepflow.stage` = 'prepare'")
    assert sorted(json.loads(r.data.params["env.task_types"])[0] for r in stages) == sorted(
        runs.values()
    )
    # started by hand, not by a pipeline: each is a run of its own, none under a pipeline run
    # (pipeline runs per set of output paths: tests/test_tracking.py)
    assert [r.info.run_name for r in stages] == ["prepare (stand-alone)"] * 2
    assert not any("mlflow.parentRunId" in r.data.tags for r in stages)
