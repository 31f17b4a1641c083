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
