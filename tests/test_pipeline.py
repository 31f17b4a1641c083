"""The main job: `dvc repro` of the whole pipeline on a tiny configuration, for real
(DVC, Prefect flows in ephemeral mode, MLflow on SQLite, ScienceWorld, the embedded model)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stepflow.config import set_by_path

REPO = Path(__file__).resolve().parent.parent
STAGES = {
    "prepare",
    "init_sft",
    "synthesize",
    "train_golden",
    "train_step",
    "train_step_nomask",
    "evaluate",
    "report",
}
TINY = {
    "env.task_types": ["find-non-living-thing"],
    "env.step_limit": 4,
    "env.workers": 2,
    "splits.train_per_task": 4,
    "splits.test_per_task": 2,
    "student.generation.max_new_tokens": 32,
    "rollout.concurrency": 2,
    "training.max_steps": 2,
    "training.max_seq_len": 1024,
    "training.save_steps": 100,
    "evaluation.bootstrap_samples": 200,
}


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory, embedded_dir) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("project")
    for name in ("stepflow", "flows", "tasks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in TINY.items():
        set_by_path(params, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/mlruns/\n/.stepflow/\n__pycache__/\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny project"], root, env)
    return root, env


@pytest.mark.slow
def test_dvc_repro_end_to_end(project) -> None:
    import mlflow
    from mlflow import MlflowClient

    root, env = project
    first = _run(["dvc", "repro"], root, env)
    assert _stages_run(first.stdout) == STAGES

    for path in (
        "data/manifest.json",
        "data/golden_d1.jsonl",
        "data/golden_d2.jsonl",
        "data/reflected.jsonl",
        "data/synthesis_stats.json",
        "reports/results.md",
        "reports/per_task.csv",
        "reports/success_by_task_test.png",
    ):
        assert (root / path).is_file(), path
    for variant in ("init_sft", "golden", "step", "step_nomask"):
        assert (root / "models" / variant / "adapter_config.json").is_file()
        assert (root / "metrics" / f"{variant}.json").is_file()
    results = (root / "reports/results.md").read_text()
    for label in ("base model", "base agent", "golden (SFT", "STeP (D1", "no masking"):
        assert label in results

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("stepflow")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("stepflow.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = {r.info.run_name for r in children}
    assert {
        "prepare",
        "init_sft",
        "synthesize",
        "train_step",
        "report",
        "evaluate_base",
        "evaluate_step",
    } <= names
    for run in children:
        assert run.data.tags.get("prefect.flow_run_id")
        assert run.data.params["training.max_steps"] == "2"
    step_eval = next(r for r in children if r.info.run_name == "evaluate_step")
    assert "test/reward" in step_eval.data.metrics and "test/success" in step_eval.data.metrics
    train_step = next(r for r in children if r.info.run_name == "train_step")
    assert {d.dataset.name for d in train_step.inputs.dataset_inputs} == {"golden_d1", "reflected"}
    assert any(a.path.startswith("adapter") for a in client.list_artifacts(train_step.info.run_id))

    second = _run(["dvc", "repro"], root, env)
    assert _stages_run(second.stdout) == set(), second.stdout

    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "first repro"], root, env)
    third = _run(["dvc", "exp", "run", "-S", "training.learning_rate=0.0003"], root, env)
    assert _stages_run(third.stdout) == STAGES - {"prepare"}, third.stdout
