"""Shared fixtures: the real embedded model, real ScienceWorld, a scratch workspace."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The materialised embedded SmolLM2 model directory."""
    from stepflow.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    """The embedded model's tokenizer."""
    from stepflow.modeling import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A copy of the repository's params.yaml in a scratch directory."""
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    return target


# A tiny workspace with prepared data and a briefly trained base agent, shared by the tests
# of synthesis, evaluation and reporting (training is the slow part on a CPU).
TINY_OVERRIDES = [
    "env.task_types=[find-non-living-thing]",
    "splits.train_per_task=6",
    "splits.test_per_task=2",
    "env.workers=2",
    "env.step_limit=10",
    "rollout.concurrency=2",
    "student.generation.max_new_tokens=40",
    "agent.one_shot=false",
    "training.max_steps=12",
    "training.learning_rate=0.001",
    "training.gradient_accumulation_steps=1",
    "training.save_steps=100",
]


@pytest.fixture(scope="session")
def base_agent_workspace(tmp_path_factory, embedded_dir) -> Path:
    """A directory with params.yaml (tiny overrides applied), prepared data and an
    `init_sft` adapter trained for a few steps on D1."""
    import yaml

    from stepflow.config import load_params, set_by_path
    from stepflow.prepare import prepare
    from stepflow.training import train_variant

    workspace = tmp_path_factory.mktemp("workspace")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in (
        (o.split("=", 1)[0], yaml.safe_load(o.split("=", 1)[1])) for o in TINY_OVERRIDES
    ):
        set_by_path(data, key, value)
    (workspace / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(workspace)
    try:
        params = load_params("params.yaml")
        prepare(params, show_progress=False)
        train_variant(params, "init_sft")
    finally:
        os.chdir(cwd)
    return workspace


def run_tiny_stages(workspace: Path, overrides: dict) -> dict:
    """prepare → init_sft (a few steps) → synthesize → evaluate init_sft on test, in
    `workspace` with params.yaml plus TINY_OVERRIDES and `overrides`; returns the outputs."""
    import yaml

    from stepflow.config import load_params, set_by_path
    from stepflow.evaluation import evaluate_agent
    from stepflow.prepare import prepare
    from stepflow.synthesize import synthesize
    from stepflow.training import train_variant

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in TINY_OVERRIDES:
        key, value = item.split("=", 1)
        set_by_path(data, key, yaml.safe_load(value))
    for key, value in {"training.max_steps": 2, **overrides}.items():
        set_by_path(data, key, value)
    (workspace / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(workspace)
    try:
        params = load_params("params.yaml")
        prepared = prepare(params, show_progress=False)
        train_variant(params, "init_sft")
        synthesis = synthesize(params, show_progress=False)
        metrics = evaluate_agent(params, "init_sft", "test", show_progress=False)
    finally:
        os.chdir(cwd)
    return {"prepare": prepared, "synthesis": synthesis, "metrics": metrics}
