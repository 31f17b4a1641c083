"""MLflow tracking on a real SQLite store: the experiment's kind and saved view, which parent
run each stage run gets (under DVC, in one process, on its own) and where the results go."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepflow import tracking
from stepflow.config import load_params


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one takes seconds); each test has its own
    experiment in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture
def workspace(store: str, tmp_path: Path, monkeypatch, request) -> dict:
    """Overrides giving the test its own experiment; the scratch directory is the working
    directory (pipeline state lives in `.stepflow/` there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for name in (tracking.DVC_STAGE_ENV, tracking.PIPELINE_ENV):
        monkeypatch.delenv(name, raising=False)
    return {"tracking.experiment": request.node.name[:60]}


def _runs(store: str, params) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], max_results=100)


def _stage(params, stage: str) -> str:
    with tracking.stage_run(params, stage) as run:
        tracking.log_metrics({"test/success": 0.5})
        return run.info.run_id


def test_the_experiment_is_a_training_experiment_with_the_agents_view(
    store, workspace, params_file
) -> None:
    from mlflow import MlflowClient

    params = load_params(params_file, workspace)
    experiment_id = tracking.configure(params.tracking, ["test"])
    tags = MlflowClient().get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert "Views" in tags[tracking.NOTE_TAG]
    view = tracking.saved_view_state(tags, tracking.AGENTS_VIEW)
    assert view is not None
    assert view["selectedColumns"] == [
        f"metrics.`test/{figure}{part}`"
        for figure in ("reward", "success")
        for part in ("", "_ci_low", "_ci_high")
    ]
    assert view["orderByKey"] == "metrics.`test/reward`" and view["orderByAsc"] is False
    assert "evaluate" in view["searchFilter"]
    url = tracking.runs_view_url(experiment_id, "http://ui")
    assert url == (
        f"http://ui/#/experiments/{experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=agents"
    )

    # more splits: the view follows; an experiment made elsewhere gets the kind tag
    tracking.configure(params.tracking, ["test", "dev"])
    tags = MlflowClient().get_experiment(experiment_id).tags
    assert (
        "metrics.`dev/reward_ci_high`"
        in tracking.saved_view_state(tags, "agents")["selectedColumns"]
    )
    other = MlflowClient().create_experiment(f"{params.tracking.experiment}-other")
    tracking.configure(
        params.tracking.model_copy(update={"experiment": f"{params.tracking.experiment}-other"})
    )
    tags = MlflowClient().get_experiment(other).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.saved_view_state(tags, "agents") is None  # no evaluation splits given


def test_dvc_stages_share_one_pipeline_run_and_later_runs_attach_to_it(
    store, workspace, params_file, monkeypatch, tmp_path
) -> None:
    params = load_params(params_file, workspace)
    monkeypatch.setenv(tracking.DVC_STAGE_ENV, "prepare")
    for stage in ("prepare", "evaluate_step", "report"):
        _stage(params, stage)
    assert tracking.stages_run_by_dvc()
    parent = tracking.end_pipeline_run(params)
    assert parent is not None
    assert tracking.end_pipeline_run(params) is None  # already ended

    # DVC reruns only the report, then a stage is started by hand: both read the outputs of
    # that pipeline run and nest under it; no new pipeline run appears
    _stage(params, "report")
    monkeypatch.delenv(tracking.DVC_STAGE_ENV)
    _stage(params, "evaluate_step")

    runs = _runs(store, params)
    pipelines = [r for r in runs if r.data.tags.get("stepflow.kind") == "pipeline"]
    assert [r.info.run_id for r in pipelines] == [parent]
    assert pipelines[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == {
        "prepare",
        "evaluate_step",
        "report",
        "report (rerun)",
        "evaluate_step (rerun)",
    }
    assert children["report (rerun)"].data.tags["stepflow.standalone"] == "true"
    assert "stepflow.standalone" not in children["report"].data.tags

    # outputs written elsewhere belong to a pipeline run of their own
    monkeypatch.setenv(tracking.DVC_STAGE_ENV, "prepare")
    elsewhere = load_params(params_file, {**workspace, "paths.data": str(tmp_path / "other-data")})
    _stage(elsewhere, "prepare")
    second = tracking.end_pipeline_run(elsewhere)
    assert second not in (None, parent)


def test_a_stage_with_no_pipeline_run_to_read_from_is_named_stand_alone(
    store, workspace, params_file
) -> None:
    params = load_params(params_file, workspace)
    run_id = _stage(params, "report")
    assert not tracking.stages_run_by_dvc()
    (run,) = _runs(store, params)
    assert run.info.run_id == run_id and run.info.run_name == "report (stand-alone)"
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["stepflow.kind"] == "stage"
    assert tracking.end_pipeline_run(params) is None


def test_a_pipeline_in_one_process_holds_its_stages_and_fails_visibly(
    store, workspace, params_file
) -> None:
    import os

    params = load_params(params_file, workspace)
    with tracking.pipeline_run(params) as parent:
        assert os.environ[tracking.PIPELINE_ENV] == parent
        assert not tracking.stages_run_by_dvc()
        child = _stage(params, "prepare")
    assert tracking.PIPELINE_ENV not in os.environ
    with (
        pytest.raises(RuntimeError, match="stage broke"),
        tracking.pipeline_run(params) as failed,
    ):
        raise RuntimeError("stage broke")
    runs = {r.info.run_id: r for r in _runs(store, params)}
    assert runs[parent].info.status == "FINISHED" and runs[failed].info.status == "FAILED"
    assert failed != parent
    assert runs[child].data.tags["mlflow.parentRunId"] == parent
    assert runs[child].info.run_name == "prepare"


def test_the_results_table_and_plots_go_on_the_pipeline_run(
    store, workspace, params_file, tmp_path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    params = load_params(params_file, workspace)
    plot = tmp_path / "success_by_task_test.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    rows = [
        {"split": "test", "agent": "step", "success": 0.5, "reward": 0.75},
        {"split": "test", "agent": "golden", "success": 0.25, "reward": 0.5},
    ]
    with tracking.pipeline_run(params) as parent, tracking.stage_run(params, "report") as run:
        target = tracking.log_results(run.info.run_id, rows, [plot])
    assert target == parent
    names = {a.path for a in MlflowClient().list_artifacts(parent)}
    assert {tracking.RESULTS_TABLE, "report"} <= names
    assert [a.path for a in MlflowClient().list_artifacts(parent, "report")] == [
        "report/success_by_task_test.png"
    ]
    table = mlflow.load_table(tracking.RESULTS_TABLE, run_ids=[parent])
    assert table["agent"].tolist() == ["step", "golden"]
    assert table["success"].tolist() == [0.5, 0.25]

    # the report run again on its own: the pipeline run's table is replaced, not appended to
    with tracking.stage_run(params, "report") as rerun:
        assert rerun.info.run_name == "report (rerun)"
        tracking.log_results(rerun.info.run_id, rows[:1], [plot])
    table = mlflow.load_table(tracking.RESULTS_TABLE, run_ids=[parent])
    assert table["agent"].tolist() == ["step"]
    tags = MlflowClient().get_run(parent).data.tags
    assert '"type": "table"' in tags["mlflow.loggedArtifacts"]  # the UI lists it as a table


def test_evaluation_metric_names_keep_the_headline_figures_together() -> None:
    from tasks.stages import mlflow_metric_name

    flat = [
        "reward",
        "reward_ci_low",
        "reward_ci_high",
        "success",
        "success_ci_low",
        "success_ci_high",
        "episodes",
        "parse_failure_rate",
        "reward/boil",
        "success/boil",
        "success_ci_low/melt",
    ]
    names = sorted(mlflow_metric_name("test", name) for name in flat)
    assert "test/task/boil/reward" in names and "test/task/melt/success_ci_low" in names
    start = names.index("test/reward")
    assert names[start : start + 6] == [
        "test/reward",
        "test/reward_ci_high",
        "test/reward_ci_low",
        "test/success",
        "test/success_ci_high",
        "test/success_ci_low",
    ]


def test_a_stage_records_files_and_figures_on_its_run(
    store, workspace, params_file, tmp_path
) -> None:
    """What the stage tasks record goes through `stepflow.tracking` onto the active run: files
    and directories under their artifact paths, the trainer's finite numeric figures with
    their step; a run is found again by id or name."""
    from mlflow import MlflowClient

    params = load_params(params_file, workspace)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    report = tmp_path / "results.md"
    report.write_text("# results\n")
    tracking.log_to_active_run({"loss": 1.0}, step=1, prefix="train/")  # no run: nothing
    with tracking.stage_run(params, "train_step") as run:
        assert tracking.active_run_id() == run.info.run_id
        tracking.log_artifacts(adapter, artifact_path="adapter/step")
        tracking.log_artifact(report, artifact_path="report")
        figures = {"loss": 0.5, "epoch": 1, "done": True, "grad": float("nan"), "note": "x"}
        tracking.log_to_active_run(figures, step=3, prefix="train/")
    client = MlflowClient()
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "adapter/step")}
    assert paths == {"adapter/step/adapter_config.json"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == [
        "report/results.md"
    ]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.value, m.step) for m in history] == [(0.5, 3)]
    assert set(client.get_run(run.info.run_id).data.metrics) == {"train/loss", "train/epoch"}
    assert tracking.find_run(run.info.run_id).info.run_id == run.info.run_id
    assert tracking.find_run(run.info.run_name).info.run_id == run.info.run_id
    with pytest.raises(LookupError, match="no MLflow run"):
        tracking.find_run("no such run")
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        tracking.active_run_id()
