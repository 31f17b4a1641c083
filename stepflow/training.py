"""Fine-tuning of the student: QLoRA (or LoRA, or full) SFT on partially masked trajectories.

One function, `train_variant`, serves every training stage. It tokenizes the variant's data
files (`stepflow.masking`), trains with transformers' `Trainer` on the pre-tokenized labels,
checkpoints into a work directory keyed by data and params (so a rerun after a crash resumes
from the last checkpoint, even when DVC has deleted the stage's outputs) and writes the adapter
atomically to `models/<variant>/` with a model card and a machine-readable `stepflow.json`.

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

import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from stepflow import tracking
from stepflow.config import Params, get_by_path, set_by_path
from stepflow.jsonl import atomic_write_json, atomic_write_text
from stepflow.masking import IGNORE_INDEX, MaskStats, build_examples
from stepflow.method import MODEL_CARD, TRAINING_PARAMS, VARIANTS, WORK_ROOT
from stepflow.method import variant as variant_spec
from stepflow.modeling import compute_dtype, device, load_model, load_tokenizer, training_method
from stepflow.provenance import code_version, file_sha256, utc_now
from stepflow.threads import torch_threads
from stepflow.trajectory import load_trajectories


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


def variant_files(params: Params, variant: str) -> list[Path]:
    """The data files a variant trains on, checked to exist."""
    paths = [params.paths.data / name for name in variant_spec(variant).files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"variant {variant!r} needs missing data file(s): {missing}")
    return paths


def run_key(params: Params, variant: str, data_hashes: dict[str, str]) -> str:
    """A hash of everything that determines a training run's result: the variant, its data
    and the params keys of `stepflow.method.TRAINING_PARAMS` (training params except
    checkpoint and logging intervals and threads, base model, seed; the agent's prompt
    budget when rows are fitted to it)."""
    declared = TRAINING_PARAMS
    data = params.model_dump(mode="json")
    identity: dict[str, Any] = {
        "variant": variant,
        "mask_erroneous": variant_spec(variant).mask_erroneous,
        "data": data_hashes,
    }
    for key in declared.digest:
        set_by_path(identity, key, get_by_path(data, key))
    for key in declared.excluded:
        parent, _, name = key.rpartition(".")
        get_by_path(identity, parent).pop(name)
    budget = [key for key in declared.keys(params) if key in declared.conditional]
    if budget:  # rows are fitted to the agent's prompt budget
        identity["prompt_budget"] = {
            key.rpartition(".")[2]: get_by_path(data, key) for key in budget
        }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (its trainer state, written last, parses)."""
    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        try:
            step = int(path.name.rsplit("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, path))
    return max(found)[1] if found else None


def _prepare_model(params: Params):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    cfg = params.training
    set_seed(params.seed)
    method = training_method(cfg.method)
    weights = "qlora" if method == "qlora" else "full"
    model = load_model(params.student.model, method=weights, dtype=params.student.dtype)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if method == "full":
        return model
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def batch_collator(packing: str, tokenizer):
    """The data collator of a `training.packing` mode (see the module docstring)."""
    if packing == "padding_free":
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )


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


def _model_card(variant: str, meta: dict[str, Any]) -> str:
    stats = meta["token_stats"]
    data = "\n".join(
        f"- `{d['file']}`: {d['trajectories']} trajectories, sha256 `{d['sha256'][:16]}…`"
        for d in meta["data"]
    )
    loss = meta["final_loss"]
    library = "peft" if meta["artifact"] == "lora_adapter" else "transformers"
    return f"""---
library_name: {library}
tags: [stepflow, step, lora, sft]
---
# stepflow `{variant}` — {VARIANTS[variant].description}

Artifact: {meta["artifact"]} on base model `{meta["base_model"]}`, trained with
`{meta["training"]["method"]}` by stepflow {meta["code_version"]}.

Masking: **{meta["masking"]}** — observations and prompts are never trained;
erroneous student steps are {"context only (label -100)" if meta["mask_erroneous"] else "trained"}.

## Data
{data}

## Tokens
- examples {stats["examples"]}, kept {stats["kept"]}, dropped {stats["dropped"]},
  truncated {stats["truncated"]}, without trained tokens {stats["empty"]}
- fitted to `max_seq_len` by eliding earlier observations {stats["fitted"]}
  ({stats["elided_observations"]} observations elided, {stats["windowed_steps"]} steps
  windowed out)
- tokens {stats["total_tokens"]}, trained {stats["trained_tokens"]}
  (fraction {stats["trained_fraction"]:.3f})
- longest trained assistant turn: {meta["max_trained_turn_tokens"]} tokens — generation
  needs `max_new_tokens` of at least this (plus a margin) to write such a turn whole

## Training
- steps {meta["global_step"]}, final loss {f"{loss:.4f}" if loss is not None else "n/a"}
- seed {meta["seed"]}; training params are in `{MODEL_CARD}`.
"""


def _publish(model, tokenizer, out_dir: Path, meta: dict[str, Any], variant: str) -> None:
    """Write the artifact into a temporary sibling directory, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        if meta["artifact"] == "full_model":
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        atomic_write_text(tmp / "README.md", _model_card(variant, meta))
        atomic_write_json(tmp / MODEL_CARD, meta)
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


TARGET_FILE = "target"  # in a run's work directory: the output directory it trains for


def _prune_stale_runs(work_dir: Path) -> None:
    """Delete the checkpoints of earlier runs of the same variant (other data or params)
    that trained for the same output directory; runs for other outputs (another seed of a
    study, another `paths.models`) are left alone."""
    variant_prefix = work_dir.name.rsplit("-", 1)[0] + "-"
    target = (work_dir / TARGET_FILE).read_text()
    for other in work_dir.parent.glob(f"{variant_prefix}*"):
        suffix = other.name[len(variant_prefix) :]
        marker = other / TARGET_FILE
        if (
            other != work_dir
            and "-" not in suffix
            and marker.is_file()
            and marker.read_text() == target
        ):
            shutil.rmtree(other, ignore_errors=True)


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

    model = _prepare_model(params)
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
        _publish(trainer.model, tokenizer, target, meta, variant)
        _prune_stale_runs(work_dir)
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
