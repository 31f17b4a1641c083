"""What the trainer measures: real, padded and trained tokens per batch and their rates in
the trainer's logs; the LM head computed only where a token is trained; and the logs sent to
the caller's active MLflow run."""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from stepflow import tracking
from stepflow.train.masking import IGNORE_INDEX


class TokenMeter:
    """Counts real (non-pad), padded and trained tokens of the batches a trainer consumes."""

    def __init__(self) -> None:
        self.real = self.padded = self.trained = 0
        self._mark = (0, 0, 0, time.perf_counter())

    def add(self, inputs: dict[str, Any]) -> None:
        """Count one batch."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else ids.numel()
        self.padded += ids.numel()
        self.trained += int((inputs["labels"] != IGNORE_INDEX).sum())

    def interval(self) -> dict[str, float]:
        """Rates since the previous call."""
        real, padded, trained, since = self._mark
        now = time.perf_counter()
        d_real, d_padded = self.real - real, self.padded - padded
        d_trained = self.trained - trained
        self._mark = (self.real, self.padded, self.trained, now)
        if d_padded == 0:
            return {}
        return {
            "tokens_per_second": d_real / max(now - since, 1e-9),
            "trained_token_fraction": d_trained / max(d_real, 1),
            "padding_fraction": 1 - d_real / d_padded,
        }


def trained_logits_only(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch with the LM head restricted to the positions whose next token is trained.

    Prompts, observations and masked steps train nothing (about 85% of a ScienceWorld
    trajectory's tokens), yet the LM head (a 576 x 49152 matmul per token for SmolLM2, a fifth
    of the model's FLOPs) and its log-softmax would run on them. The loss is the same sum over
    the same targets, divided by the same count (tests/test_training.py).
    """
    targets = inputs.get("shift_labels")
    if targets is None:
        targets = torch.nn.functional.pad(inputs["labels"][..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": targets[keep]}


class MeteredTrainer(Trainer):
    """`Trainer` that counts tokens per batch, adds throughput to its logs and computes the
    LM head only where a token is trained (`trained_logits_only`, for models that take
    `logits_to_keep`)."""

    def __init__(self, *args: Any, meter: TokenMeter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.trim_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.meter.add(inputs)
        if self.trim_logits:
            inputs = trained_logits_only(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.meter.interval())
        super().log(logs, start_time)


class MlflowMetrics(TrainerCallback):
    """Send the trainer's logs to the caller's active MLflow run, if any."""

    def __init__(self, prefix: str = "train/") -> None:
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        tracking.log_to_active_run(logs or {}, state.global_step, self.prefix)
