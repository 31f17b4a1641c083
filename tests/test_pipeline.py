"""The main job: `dvc repro` of the whole pipeline on a tiny configuration, for real
(DVC, Prefect flows in ephemeral mode, MLflow on SQLite, ScienceWorld, the embedded model), and
what the MLflow UI shows of it (a real `mlflow server`, its REST API and headless Chromium)."""

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
    "train@golden",
    "train@step",
    "train@step_nomask",
    "evaluate",
    "report",
}
# the MLflow (and Prefect flow) run of each stage: DVC's `train@<variant>` runs as `train_<variant>`
STAGE_RUNS = {stage.replace("@", "_") for stage in STAGES}
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
    "evaluation.agents": ["base", "init_sft", "golden", "step", "step_nomask"],  # base: opt-in
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


@pytest.fixture(scope="module")
def first_repro(project, tmp_path_factory) -> tuple[str, str]:
    """The first `dvc repro` of the tiny project: its output (stdout, then the stages' logs on
    stderr) and a copy of the MLflow store as it left it (later tests change the project's own
    store)."""
    root, env = project
    first = _run(["dvc", "repro"], root, env)
    snapshot = tmp_path_factory.mktemp("store") / "mlflow.db"
    shutil.copy(root / "mlruns" / "mlflow.db", snapshot)
    return f"{first.stdout}\n{first.stderr}", f"sqlite:///{snapshot}"


def _pipeline_runs(client, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id], "tags.`stepflow.kind` = 'pipeline'")
    return sorted(runs, key=lambda r: r.info.start_time)


@pytest.mark.slow
def test_dvc_repro_end_to_end(project, first_repro) -> None:
    import mlflow
    from mlflow import MlflowClient

    root, env = project
    first_output, _ = first_repro
    assert _stages_run(first_output) == STAGES
    assert "MLflow, the agents side by side: http" in first_output

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
    assert {p.name for p in (root / "metrics").iterdir()} == {
        f"{agent}.json" for agent in TINY["evaluation.agents"]
    }
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
    # the experiment's stages form a pipeline run of their own
    first_pipeline, latest = _pipeline_runs(client, experiment.experiment_id)
    assert first_pipeline.info.run_id == parents[0].info.run_id
    assert latest.info.status == "FINISHED"

    # the report flow started on its own reads the latest pipeline run's outputs: it nests
    # under that run, named as a rerun, and opens no pipeline run
    _run([sys.executable, "-m", "flows", "report"], root, env)
    assert len(_pipeline_runs(client, experiment.experiment_id)) == 2
    (rerun,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'report (rerun)'"
    )
    assert rerun.data.tags["mlflow.parentRunId"] == latest.info.run_id
    assert client.get_run(latest.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_study_skips_the_stages_done_and_runs_the_rest(project, first_repro) -> None:
    """`stepflow study run` on a seed whose outputs are the repro's (copied under the study's
    root), one evaluation missing: only that evaluation runs, then the summary is written;
    a second run has nothing to do."""
    import json

    root, env = project
    seed = root / "study" / "seed-0"
    for name in ("data", "models", "metrics"):
        shutil.copytree(root / name, seed / name)
    shutil.rmtree(seed / "data" / "eval" / "step")
    (seed / "metrics" / "step.json").unlink()
    command = ["stepflow", "study", "run", "-p", "params.yaml", "-S", "study.seeds=[0]"]

    first = _run(command, root, env)
    assert re.findall(r"seed 0: (\w+)", first.stdout + first.stderr) == ["evaluate_step", "report"]
    assert (seed / "data" / "eval" / "step" / "test.jsonl").is_file()
    assert set(json.loads((seed / "timings.json").read_text())) == {"evaluate_step", "report"}
    summary = json.loads((root / "results" / "study.json").read_text())
    assert set(summary["agents"]) == {"base", "init_sft", "golden", "step", "step_nomask"}
    assert summary["agents"]["step"]["seeds"]["0"]["episodes"] == 2
    assert summary["paired"]["instances"] == 2 and summary["paired"]["seeds"] == [0]
    assert (root / "results" / "study.md").read_text().startswith("Protocol: **stepflow**")

    again = _run(command, root, env)
    assert "seed 0: every stage is done" in again.stdout + again.stderr


def _api(base: str, path: str, body: dict | None = None) -> dict:
    """One call of the MLflow server's REST API (GET, or POST with a JSON body)."""
    import json
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_mlflow_ui_compares_the_agents(first_repro, tmp_path) -> None:
    """The real MLflow UI server on the pipeline's store: the experiment is a training
    experiment, the pipeline run holds the stage runs and the results table, the evaluation
    runs carry the headline metrics, and the runs page a person opens shows them."""
    import json
    import urllib.parse
    import urllib.request

    from mlflow import MlflowClient

    from stepflow import tracking
    from stepflow.tracking import ui as mlflow_ui

    _, store = first_repro
    # an experiment with no runs in the same store: the page check must fail on it
    empty_id = MlflowClient(store).create_experiment(
        "empty", artifact_location=(tmp_path / "empty").as_uri()
    )
    with mlflow_ui.mlflow_server(store, log_file=tmp_path / "server.log") as base:
        experiment = _api(base, "experiments/get-by-name?experiment_name=stepflow")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert (
            "metrics.`test/success`" in tracking.saved_view_state(tags, "agents")["selectedColumns"]
        )

        found = _api(
            base,
            "runs/search",
            {"experiment_ids": [experiment["experiment_id"]], "max_results": 200},
        )["runs"]
        runs = [
            {
                "id": r["info"]["run_id"],
                "name": r["info"]["run_name"],
                "status": r["info"]["status"],
                "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])},
                "metrics": {m["key"]: m["value"] for m in r["data"].get("metrics", [])},
            }
            for r in found
        ]
        (parent,) = [r for r in runs if r["tags"].get("stepflow.kind") == "pipeline"]
        assert parent["name"] == "step_pipeline" and parent["status"] == "FINISHED"
        children = {
            r["name"]: r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["id"]
        }
        agents = ["base", "init_sft", "golden", "step", "step_nomask"]
        # one run per stage, the evaluate stage as one run per agent
        assert set(children) == STAGE_RUNS - {"evaluate"} | {f"evaluate_{a}" for a in agents}
        assert len(runs) == 1 + len(children)  # nothing outside the pipeline run
        for agent in agents:
            metrics = children[f"evaluate_{agent}"]["metrics"]
            for figure in ("success", "reward"):
                low, mean, high = (
                    metrics[f"test/{figure}{part}"] for part in ("_ci_low", "", "_ci_high")
                )
                assert 0.0 <= low <= mean <= high <= 1.0, (agent, figure, low, mean, high)
            assert "test/task/find-non-living-thing/reward" in metrics

        listed = _api(base, f"artifacts/list?run_id={parent['id']}")
        assert {f["path"] for f in listed["files"]} >= {"results_table.json", "report"}
        report = _api(base, f"artifacts/list?run_id={parent['id']}&path=report")
        assert "report/success_by_task_test.png" in {f["path"] for f in report["files"]}
        query = urllib.parse.urlencode({"path": "results_table.json", "run_uuid": parent["id"]})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as answer:
            table = json.loads(answer.read())
        column = table["columns"].index("agent")
        assert sorted(row[column] for row in table["data"]) == sorted(agents)

        # the page a person opens (headless Chromium renders the JavaScript app)
        if mlflow_ui.chromium() is None:
            if os.environ.get("CI"):
                pytest.fail("chromium is not installed (.ci/run installs it)")
            pytest.skip("chromium is not installed (apt-get install chromium)")
        url = tracking.runs_view_url(experiment["experiment_id"], base)
        text = mlflow_ui.page_text(url)
        mlflow_ui.check_runs_page(
            text,
            [f"evaluate_{agent}" for agent in agents],
            ["test/success", "test/success_ci_low", "test/reward", "test/reward_ci_high"],
        )
        assert mlflow_ui.runs_shown(text) == len(agents)
        assert "train_step" not in text and "synthesize" not in text  # the view: agents only
        picture = mlflow_ui.screenshot(url, tmp_path / "runs.png", width=1200, height=700)
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(picture.read_bytes()[16:20], "big") == 1200  # PNG width

        # the same check fails on a runs page with no runs
        empty = mlflow_ui.page_text(tracking.runs_view_url(empty_id, base, view=None))
        assert mlflow_ui.runs_shown(empty) == 0
        with pytest.raises(AssertionError, match="shows no runs"):
            mlflow_ui.check_runs_page(empty, [], [])
