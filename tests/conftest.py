"""Shared fixtures: the real embedded model, real ScienceWorld, a scratch workspace."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # Test workers share the cores: torch on one thread each (and in every process a test
    # starts). Two OpenMP threads per process wait for each other at every op whenever
    # another process holds a core; a worker's test ran 3x slower that way.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


# The test files with the longest runs (`make test` prints each test's duration), started
# first so that the test workers (`make test` runs two, one file each at a time, in this
# order: `--no-loadscope-reorder`) finish together rather than one of them running a long
# file alone at the end.
LONGEST_FIRST = (
    "test_reliability.py",
    "test_pipeline.py",
    "test_prepare.py",
    "test_teacher.py",
    "test_prefect.py",
    "test_scaleout.py",
    "test_serving.py",
    "test_evaluation.py",
    "test_alfworld.py",
    "test_webshop.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of LONGEST_FIRST first, in that order; the others keep theirs."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The materialised embedded SmolLM2 model directory."""
    from stepflow.llm.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    """The embedded model's tokenizer."""
    from stepflow.train.modeling import load_tokenizer

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


def write_tiny_params(workspace: Path, overrides: dict | None = None) -> None:
    """`workspace/params.yaml`: the repository's params with TINY_OVERRIDES, then `overrides`
    (dotted keys) applied."""
    import yaml

    from stepflow.config import parse_overrides, set_by_path

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**parse_overrides(TINY_OVERRIDES), **(overrides or {})}.items():
        set_by_path(data, key, value)
    (workspace / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@contextlib.contextmanager
def inside(workspace: Path) -> Iterator[None]:
    """Run the block with `workspace` as the working directory."""
    cwd = Path.cwd()
    os.chdir(workspace)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def base_agent_workspace(tmp_path_factory, embedded_dir) -> Path:
    """A directory with params.yaml (tiny overrides applied), prepared data and an
    `init_sft` adapter trained for a few steps on D1."""
    from stepflow.config import load_params
    from stepflow.data.prepare import prepare
    from stepflow.train.sft import train_variant

    workspace = tmp_path_factory.mktemp("workspace")
    write_tiny_params(workspace)
    with inside(workspace):
        params = load_params("params.yaml")
        prepare(params, show_progress=False)
        train_variant(params, "init_sft")
    return workspace


def run_tiny_stages(workspace: Path, overrides: dict) -> dict:
    """prepare → init_sft (a few steps) → synthesize → evaluate init_sft on test, in
    `workspace` with params.yaml plus TINY_OVERRIDES and `overrides`; returns the outputs."""
    from stepflow.config import load_params
    from stepflow.data.prepare import prepare
    from stepflow.evaluate.evaluation import evaluate_agent
    from stepflow.teacher.synthesis import synthesize
    from stepflow.train.sft import train_variant

    write_tiny_params(workspace, {"training.max_steps": 2, **overrides})
    with inside(workspace):
        params = load_params("params.yaml")
        prepared = prepare(params, show_progress=False)
        train_variant(params, "init_sft")
        synthesis = synthesize(params, show_progress=False)
        metrics = evaluate_agent(params, "init_sft", "test", show_progress=False)
    return {"prepare": prepared, "synthesis": synthesis, "metrics": metrics}
