"""Data-parallel training: 2 processes on the gloo backend (CPU) against 1 process on the
same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepflow.config import load_params
from stepflow.data.trajectory import write_trajectories
from stepflow.train.launch import launch_command, train
from tests.sample_trajectories import golden_find_non_living, golden_lifespan

STEPS = 4


def losses(history: list[dict]) -> list[float]:
    """The training loss of every logged step."""
    return [entry["loss"] for entry in history if "loss" in entry]


def test_launch_commands(params_file: Path) -> None:
    torchrun = launch_command(
        load_params(params_file, {"training.distributed.nproc": 2}), Path("job")
    )
    assert torchrun[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "stepflow.train.launch",
        "job",
    ]
    params = load_params(
        params_file, {"training.distributed": {"nproc": 2, "launcher": "accelerate"}}
    )
    accelerate = launch_command(params, Path("job"))
    assert accelerate[1:4] == ["launch", "--num_processes", "2"]
    assert accelerate[-3:] == ["-m", "stepflow.train.launch", "job"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_on_the_same_global_batch(
    tmp_path: Path, params_file: Path, embedded_dir, monkeypatch
) -> None:
    """QLoRA with DDP on the CPU: 1 process x accumulation 2 and 2 processes x accumulation
    1 see the same 2 trajectories per step and log the same losses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    golden = [golden_find_non_living, golden_lifespan]
    write_trajectories(Path("data/golden_d1.jsonl"), [golden[v % 2](v) for v in range(2 * STEPS)])
    common = {
        "training.method": "qlora",
        "training.lora.r": 8,
        "training.lora.dropout": 0.0,
        "training.batch_size": 1,
        "training.max_seq_len": 384,
        "training.max_steps": STEPS,
        "training.learning_rate": 0.001,
        "training.logging_steps": 1,
        "training.save_steps": 100,
        "training.gradient_checkpointing": False,
    }
    one = load_params(
        params_file,
        {**common, "training.gradient_accumulation_steps": 2, "training.distributed.nproc": 1},
    )
    two = load_params(
        params_file,
        {**common, "training.gradient_accumulation_steps": 1, "training.distributed.nproc": 2},
    )
    single = train(one, "init_sft", out_dir=Path("models/one"), work_root=Path("work"))
    double = train(two, "init_sft", out_dir=Path("models/two"), work_root=Path("work"))
    assert single.global_step == double.global_step == STEPS
    assert losses(double.log_history) == pytest.approx(losses(single.log_history), rel=1e-3)
    assert len(losses(single.log_history)) == STEPS
    assert (Path("models/two") / "adapter_config.json").is_file()
    assert double.stats.kept == single.stats.kept == 2 * STEPS
