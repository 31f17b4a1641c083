"""The published artifact of a training run: the adapter (or full model) with its model card
(`README.md`) and the machine-readable `stepflow.json`, written into a temporary sibling
directory and renamed into place."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from stepflow.data.jsonl import atomic_write_json, atomic_write_text
from stepflow.method import MODEL_CARD, VARIANTS


def model_card(variant: str, meta: dict[str, Any]) -> str:
    """The model card (`README.md`) of a variant's artifact, from its `stepflow.json`."""
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


def publish(model, tokenizer, out_dir: Path, meta: dict[str, Any], variant: str) -> None:
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
        atomic_write_text(tmp / "README.md", model_card(variant, meta))
        atomic_write_json(tmp / MODEL_CARD, meta)
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
