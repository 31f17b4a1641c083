"""params.yaml validation: good files load, each kind of bad input names its culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from stepflow.config import ConfigError, Params, load_params

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["params.yaml", "params.paper.yaml", "params.study.yaml"])
def test_shipped_params_files_are_valid(name: str) -> None:
    path = REPO / name
    if not path.exists():
        pytest.fail(f"{name} missing from the repository")
    params = load_params(path)
    assert isinstance(params, Params)
    assert params.env.task_types


def test_the_paper_params_hold_the_papers_setup() -> None:
    """Every task type of the real ScienceWorld, the paper's student, teacher and QLoRA rank."""
    from scienceworld import ScienceWorldEnv

    simulator = ScienceWorldEnv("")
    try:
        names = simulator.get_task_names()
    finally:
        simulator.close()
    paper = load_params(REPO / "params.paper.yaml")
    assert len(names) == 30 and sorted(paper.env.task_types) == sorted(names)
    assert paper.env.simplification == "easy"
    assert paper.student.model == "meta-llama/Llama-2-7b-chat-hf"
    assert paper.teacher.kind == "llm" and paper.teacher.reflection == "llm"
    assert paper.teacher.llm is not None and paper.teacher.llm.model == "Qwen/Qwen1.5-110B-Chat"
    assert paper.golden.thoughts == "teacher"
    assert paper.training.method == "qlora" and paper.training.lora.r == 64


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BAD_CASES = [
    ("unknown top-level key", lambda d: d.update(trainig={"epochs": 1}), "trainig", "unknown key"),
    (
        "unknown nested key",
        lambda d: d["training"]["lora"].update(rank=8),
        "training.lora.rank",
        "unknown key",
    ),
    (
        "wrong type",
        lambda d: d["training"].update(epochs="many"),
        "training.epochs",
        "valid number",
    ),
    (
        "fraction above 1",
        lambda d: d["splits"].update(u1_fraction=1.5),
        "splits.u1_fraction",
        "less than 1",
    ),
    (
        "fraction of 0",
        lambda d: d["splits"].update(u1_fraction=0),
        "splits.u1_fraction",
        "greater than 0",
    ),
    (
        "lora r of 0",
        lambda d: d["training"]["lora"].update(r=0),
        "training.lora.r",
        "greater than 0",
    ),
    (
        "negative lora r",
        lambda d: d["training"]["lora"].update(r=-4),
        "training.lora.r",
        "greater than 0",
    ),
    ("no task types", lambda d: d["env"].update(task_types=[]), "env.task_types", "at least 1"),
    (
        "openai backend without endpoint",
        lambda d: d["student"].update(backend="openai"),
        "student",
        "endpoint",
    ),
    (
        "unknown teacher kind",
        lambda d: d["teacher"].update(kind="oracle"),
        "teacher.kind",
        "reference",
    ),
]


@pytest.mark.parametrize(
    ("label", "mutate", "key", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_bad_params_name_file_and_key(tmp_path, label, mutate, key, message) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = str(info.value)
    assert str(path) in text
    assert f" {key}:" in text
    assert message in text


def test_error_gives_line_of_the_bad_key(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    text = (REPO / "params.yaml").read_text().replace("    r: 16", "    r: 0")
    path.write_text(text)
    expected_line = next(i for i, line in enumerate(text.splitlines(), 1) if line == "    r: 0")
    with pytest.raises(ConfigError, match=rf"{path}:{expected_line}: training.lora.r"):
        load_params(path)


def test_overrides_apply_and_are_validated(params_file) -> None:
    params = load_params(params_file, ["training.epochs=3", "env.task_types=[boil]"])
    assert params.training.epochs == 3
    assert params.env.task_types == ["boil"]
    with pytest.raises(ConfigError, match=r"override training.lora.r"):
        load_params(params_file, ["training.lora.r=0"])
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_params(params_file, ["training.epochs"])


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("env: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{broken}: not valid YAML"):
        load_params(broken)


def test_params_hash_tracks_content(params_file) -> None:
    a = load_params(params_file)
    b = load_params(params_file, ["training.epochs=5"])
    assert a.section_hash() != b.section_hash()
    assert a.section_hash("env") == b.section_hash("env")


def test_cli_config_check(params_file, tmp_path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "check", "--params", str(params_file)])
    assert ok.exit_code == 0, ok.output
    bad = _write(tmp_path, lambda d: d["training"]["lora"].update(r=0))
    result = runner.invoke(app, ["config", "check", "--params", str(bad)])
    assert result.exit_code == 2
    assert "training.lora.r" in result.output
