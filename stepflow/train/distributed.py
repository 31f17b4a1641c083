"""A data-parallel training run as one of its processes sees it: the run's size, whether this
is rank 0 (the only process that writes files), and the collective backend."""

from __future__ import annotations

import os

from stepflow.config import Params
from stepflow.train.modeling import device


def world_size() -> int:
    """Processes of this training run (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """Whether this is rank 0 of the training run (the only process that writes files)."""
    return int(os.environ.get("RANK", "0")) == 0


def ddp_backend(params: Params) -> str | None:
    """The collective backend of a multi-process run (None when there is one process)."""
    if world_size() == 1:
        return None
    chosen = params.training.distributed.backend
    if chosen != "auto":
        return chosen
    return "nccl" if device() == "cuda" else "gloo"
