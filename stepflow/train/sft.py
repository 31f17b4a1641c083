"""Fine-tuning of the student: QLoRA (or LoRA, or full) SFT on partially masked trajectories.

One function, `train_variant`, serves every training stage (`stepflow.train.launch.train`
runs it in one process or several). It tokenizes the variant's data files (`examples`), trains
with transformers' `Trainer` on the pre-tokenized labels (`metering`), checkpoints into a work
directory keyed by data and params (`runs`: a rerun after a crash resumes from the last
checkpoint, even when DVC has deleted the stage's outputs) and writes the adapter atomically
to `models/<variant>/` with a model card and a machine-readable `stepflow.json` (`card`).

Batching (`training.packing`):
- `padding_free`: the trajectories of a batch are concatenated into one row with position
  ids restarting at each trajectory and no attention mask (`DataCollatorWithFlattening`).
  transformers derives a block-diagonal causal mask from the position ids for sdpa and eager
  attention as well as flash attention, so no token attends across trajectories. That
  detection only happens without a KV cache, so training always runs with `use_cache=False`
  (with the cache on, trajectories would silently attend to each other). Without flash
  attention the block-diagonal mask is applied densely: attention over a packed row costs
  (sum of lengths)^2, so on CPU it measures on par with `length_grouped`
  (benchmarks/bench_training.py); its advantage grows with flash attention's varlen kernels.
- `length_grouped`: padded batches of trajectories of similar length (transformers'
  `LengthGroupedSampler`, longest batch first).
- `none`: padded batches in random order.
With `batch_size: 1` the three are the same: one trajectory per row, no padding.

Metrics (loss, learning rate, tokens/s, trained-token fraction, padding fraction) go to the
Trainer's log and, when the caller has an active MLflow run, to that run. After a successful
run the checkpoints of earlier runs of the same variant (other data or params) are deleted.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    TrainerCallback,
    TrainingArguments,
)

from stepflow import tracking
from stepflow.config import Params
from stepflow.data.jsonl import atomic_write_json, atomic_write_text
from stepflow.data.trajectory import load_trajectories
from stepflow.method import WORK_ROOT
from stepflow.method import variant as variant_spec
from stepflow.provenance import code_version, file_sha256, utc_now
from stepflow.threads import torch_threads
from stepflow.train.card import publish
from stepflow.train.distributed import ddp_backend, main_process
from stepflow.train.examples import MaskStats, build_examples
from stepflow.train.masking import IGNORE_INDEX
from stepflow.train.metering import MeteredTrainer, MlflowMetrics, TokenMeter
from stepflow.train.modeling import (
    compute_dtype,
    device,
    load_tokenizer,
    prepare_for_training,
    training_method,
)
from stepflow.train.runs import (
    TARGET_FILE,
    last_checkpoint,
    prune_stale_runs,
    run_key,
    variant_files,
)


@dataclass
class TrainResult:
    """What a training run produced."""

    variant: str
    output_dir: Path
    work_dir: Path
    global_step: int
    final_loss: float | None
    resumed_from: str | None
    stats: MaskStats
    tokens_per_second: float
    train_seconds: float
    log_history: list[dict[str, Any]] = field(default_factory=list)


def training_prompt_budget(params: Params) -> int | None:
    """The agent's prompt budget that `elide` fits training rows to (None otherwise): the
    same as at inference (stepflow.agent.context)."""
    if params.training.truncation != "elide":
        return None
    from stepflow.agent.context import context_budget

    return context_budget(
        params.agent.max_context_tokens,
        params.student,
        params.student.generation.max_new_tokens,
        "agent.max_context_tokens",
    )


def batch_collator(packing: str, tokenizer):
    """The data collator of a `training.packing` mode (see the module docstring)."""
    if packing == "padding_free":
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )


def _training_args(params: Params, checkpoints: Path) -> TrainingArguments:
    cfg = params.training
    dtype = compute_dtype(cfg.compute_dtype, params.student.dtype)
    on_gpu = device() == "cuda"
    warmup: float = cfg.warmup_ratio if cfg.warmup_ratio < 1 else 0.999
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=warmup,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=params.seed,
        data_seed=params.seed,
        bf16=dtype == torch.bfloat16,  # autocast, on a CPU too (training.compute_dtype)
        fp16=dtype == torch.float16,
        train_sampling_strategy=(
            "group_by_length" if cfg.packing == "length_grouped" else "random"
        ),
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
        report_to="none",
        ddp_backend=ddp_backend(params),
        use_cpu=not on_gpu,  # also makes a multi-process CPU run data-parallel (gloo)
        ddp_find_unused_parameters=False,
    )


def _final_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return float(losses[-1]) if losses else None


def train_variant(
    params: Params,
    variant: str,
    *,
    out_dir: Path | None = None,
    resume: bool = True,
    work_root: Path | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Train one variant from the base model; write its adapter to `out_dir`.

    `out_dir` defaults to `<paths.models>/<variant>`. With `resume`, a rerun with the same
    data and params continues from the last checkpoint in the work directory
    (`<work_root>/train-<variant>-<run key>`); without, it starts over.
    """
    spec = variant_spec(variant)
    cfg = params.training
    files = variant_files(params, variant)
    hashes = {path.name: file_sha256(path) for path in files}
    work_dir = (work_root or WORK_ROOT) / f"train-{variant}-{run_key(params, variant, hashes)}"
    checkpoints = work_dir / "checkpoints"
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    target = Path(out_dir or spec.output_dir(params.paths.models))
    atomic_write_text(work_dir / TARGET_FILE, str(target.resolve()))

    tokenizer = load_tokenizer(params.student.model)
    tokenizer.padding_side = "right"
    counts = {}
    trajectories = []
    for path in files:
        loaded = load_trajectories(path)
        counts[path.name] = len(loaded)
        trajectories.extend(loaded)
    examples, stats = build_examples(
        trajectories,
        tokenizer,
        mask_erroneous=spec.mask_erroneous,
        max_seq_len=cfg.max_seq_len,
        truncation=cfg.truncation,
        prompt_budget=training_prompt_budget(params),
    )
    if not examples:
        raise ValueError(f"variant {variant!r}: no trainable example in {[str(p) for p in files]}")
    if main_process():
        atomic_write_json(work_dir / "token_stats.json", stats.as_dict())
        tracking.log_to_active_run(stats.as_dict(), step=0, prefix="data/")

    model = prepare_for_training(params)
    method = training_method(cfg.method)  # as resolved on this machine, for the card
    dtype = str(compute_dtype(cfg.compute_dtype, params.student.dtype)).removeprefix("torch.")
    meter = TokenMeter()
    trainer = MeteredTrainer(
        model=model,
        args=_training_args(params, checkpoints),
        train_dataset=examples,
        data_collator=batch_collator(cfg.packing, tokenizer),
        callbacks=[MlflowMetrics(), *(callbacks or [])],
        meter=meter,
    )
    start = last_checkpoint(checkpoints) if resume else None
    began = time.perf_counter()
    with torch_threads(cfg.threads):
        trainer.train(resume_from_checkpoint=str(start) if start else None)
    seconds = time.perf_counter() - began
    history = list(trainer.state.log_history)
    final_loss = _final_loss(history)

    meta = {
        "variant": variant,
        "description": spec.description,
        "artifact": "full_model" if method == "full" else "lora_adapter",
        "base_model": params.student.model,
        "dtype": params.student.dtype,
        "masking": "partial" if spec.mask_erroneous else "none",
        "mask_erroneous": spec.mask_erroneous,
        "data": [
            {"file": name, "sha256": digest, "trajectories": counts[name]}
            for name, digest in hashes.items()
        ],
        "training": {**cfg.model_dump(mode="json"), "method": method, "compute_dtype": dtype},
        "seed": params.seed,
        "token_stats": stats.as_dict(),
        "max_trained_turn_tokens": stats.max_trained_turn_tokens,
        "global_step": trainer.state.global_step,
        "final_loss": final_loss,
        "resumed_from": start.name if start else None,
        "losses": [[e["step"], e["loss"]] for e in history if "loss" in e],
        "run_key": work_dir.name,
        "code_version": code_version(),
        "created_at": utc_now().isoformat(),
    }
    if trainer.is_world_process_zero():  # the other ranks of a data-parallel run write nothing
        publish(trainer.model, tokenizer, target, meta, variant)
        prune_stale_runs(work_dir)
    return TrainResult(
        variant=variant,
        output_dir=target,
        work_dir=work_dir,
        global_step=trainer.state.global_step,
        final_loss=final_loss,
        resumed_from=start.name if start else None,
        stats=stats,
        tokens_per_second=meter.real / seconds if seconds > 0 else 0.0,
        train_seconds=seconds,
        log_history=history,
    )
