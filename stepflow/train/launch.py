"""Data-parallel training: `train_variant` in `training.distributed.nproc` processes.

The launcher (`torchrun` or `accelerate launch`) starts one process per GPU (on a CPU: per
core, on the gloo backend); each runs `python -m stepflow.train.launch`, which trains with the
params written by the parent. transformers' `Trainer` wraps the model in DDP, gives every
rank its own share of each global batch (batch_size x gradient_accumulation_steps x nproc)
and averages gradients. Only rank 0 writes the adapter, checkpoints and the result file the
parent reads; nothing in the children logs to MLflow (the parent does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from stepflow.config import Params
from stepflow.locking import holds_outputs
from stepflow.train.examples import MaskStats

RESULT_FILE = "launch_result.json"


def launch_command(params: Params, job_dir: Path) -> list[str]:
    """The command that runs the job of `job_dir` in `training.distributed.nproc` processes."""
    dist = params.training.distributed
    target = ["-m", "stepflow.train.launch", str(job_dir)]
    if dist.launcher == "accelerate":
        accelerate = shutil.which("accelerate") or "accelerate"
        command = [accelerate, "launch", "--num_processes", str(dist.nproc)]
        if dist.nproc > 1:
            command.append("--multi_gpu" if _cuda() else "--multi_cpu")
        return [*command, "--num_machines", "1", *target]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={dist.nproc}",
        *target,
    ]


def _cuda() -> bool:
    from stepflow.train.modeling import device

    return device() == "cuda"


def train_launched(
    params: Params,
    variant: str,
    *,
    out_dir: Path | None = None,
    resume: bool = True,
    work_root: Path | None = None,
):
    """Run `train_variant` under the configured launcher; return rank 0's `TrainResult`."""
    from stepflow.method import WORK_ROOT
    from stepflow.train.sft import TrainResult

    root = Path(work_root or WORK_ROOT).resolve()
    job_dir = root / f"launch-{variant}-{os.getpid()}"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    job = {
        "params": params.model_dump(mode="json"),
        "variant": variant,
        "out_dir": str(Path(out_dir).resolve()) if out_dir else None,
        "resume": resume,
        "work_root": str(root),
    }
    (job_dir / "job.json").write_text(json.dumps(job))
    command = launch_command(params, job_dir)
    try:
        done = subprocess.run(command, check=False)
        result_path = job_dir / RESULT_FILE
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(
                f"training of {variant!r} in {params.training.distributed.nproc} processes "
                f"failed (exit {done.returncode}): {' '.join(command)}"
            )
        data = json.loads(result_path.read_text())
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    stats = dict(data["stats"])
    stats.pop("trained_fraction", None)  # derived, recomputed by MaskStats
    data["stats"] = MaskStats(**stats)
    for key in ("output_dir", "work_dir"):
        data[key] = Path(data[key])
    return TrainResult(**data)


@holds_outputs("train")
def train(params: Params, variant: str, **kwargs):
    """Train a variant in process, or launched in several when `distributed.nproc` > 1
    (holding the run's outputs, see `stepflow.locking`)."""
    from stepflow.train.distributed import world_size
    from stepflow.train.sft import train_variant

    if params.training.distributed.nproc > 1 and world_size() == 1:
        return train_launched(params, variant, **kwargs)
    return train_variant(params, variant, **kwargs)


def _main(job_dir: Path) -> None:
    from stepflow.train.distributed import main_process
    from stepflow.train.sft import train_variant

    job = json.loads((job_dir / "job.json").read_text())
    params = Params.model_validate(job["params"])
    result = train_variant(
        params,
        job["variant"],
        out_dir=Path(job["out_dir"]) if job["out_dir"] else None,
        resume=job["resume"],
        work_root=Path(job["work_root"]),
    )
    if main_process():
        data = asdict(result)
        data["stats"] = result.stats.as_dict()
        data["output_dir"], data["work_dir"] = str(result.output_dir), str(result.work_dir)
        (job_dir / RESULT_FILE).write_text(json.dumps(data, default=str))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
