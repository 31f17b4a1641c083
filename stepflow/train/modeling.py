"""Loading tokenizers and causal LMs: full precision, LoRA, or 4-bit QLoRA; optional adapter;
the device, dtypes and torch threads they run with, and the student prepared for training."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stepflow.llm.embedded import resolve_model
from stepflow.method import ADAPTER_CONFIG, MODEL_CARD

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stepflow.config import Params

Method = Literal["qlora", "lora", "full"]
_LOADING = threading.RLock()  # one load at a time in a process (see load_model)


def device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def placement() -> str:
    """Where this process puts the model: its own GPU in a data-parallel run (LOCAL_RANK set
    by torchrun / accelerate launch), else `device()`."""
    import os

    if device() == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16).

    Where it does, bf16 matmuls run about 2x faster than fp32 (benchmarks/bench_matmul.py);
    elsewhere oneDNN emulates bf16 and it is slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags = set(line.partition(":")[2].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def training_method(name: str) -> Method:
    """Resolve `training.method`: 'auto' is QLoRA on a GPU and LoRA on a CPU.

    On a CPU, bitsandbytes multiplies 4-bit weights by dequantizing them to a full-precision
    copy at every forward and backward; that costs time and, for a small model, saves no
    memory that matters (benchmarks/bench_training.py).
    """
    if name == "auto":
        return "qlora" if device() == "cuda" else "lora"
    if name not in ("qlora", "lora", "full"):
        raise ValueError(f"unknown training method {name!r}; known: auto, qlora, lora, full")
    return name  # type: ignore[return-value]


def compute_dtype(name: str, student_dtype: str = "auto") -> torch.dtype:
    """Resolve `training.compute_dtype`, the dtype training's matmuls run in (autocast).

    'auto': on a GPU the student's dtype (bf16 by default); on a CPU bf16 where the CPU has
    native bf16 instructions (`cpu_has_native_bf16`), else fp32. Weights, LoRA adapters,
    gradients and optimizer state stay in the student's dtype either way.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device() == "cuda":
        return torch_dtype(student_dtype)
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def torch_dtype(name: str) -> torch.dtype:
    """Map a params.yaml dtype name to a torch dtype ('auto': bf16 on GPU, fp32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device() == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad token set when the model has none."""
    with _LOADING:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"model {model!r} has no chat template; stepflow needs one")
    return tokenizer


def quantization_config(dtype: str = "auto"):
    """The QLoRA 4-bit config: nf4, double quantization, compute in the model dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
    )


def load_model(
    model: str,
    method: Method = "full",
    dtype: str = "auto",
    adapter: str | Path | None = None,
) -> PreTrainedModel:
    """Load a causal LM; `method='qlora'` quantizes to 4-bit nf4. `adapter` attaches a LoRA."""
    path = resolve_model(model)
    kwargs: dict = {"dtype": torch_dtype(dtype)}
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": placement()}
    # transformers imports lazily and builds the model on the meta device with process-wide
    # patches: two threads loading at once (shards on a thread runner) break each other
    with _LOADING:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if method != "qlora":
            lm.to(placement())
        if adapter is not None:
            lm = attach_adapter(lm, adapter, expected_base=model)
    return lm


def adapter_base_model(adapter: str | Path) -> str | None:
    """The base model recorded in an adapter directory, if any."""
    config = Path(adapter) / ADAPTER_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{adapter}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    return json.loads(config.read_text()).get("base_model_name_or_path")


def attach_adapter(lm: PreTrainedModel, adapter: str | Path, expected_base: str | None = None):
    """Wrap `lm` with a saved LoRA adapter, checking it was trained on a compatible base."""
    from peft import PeftModel

    recorded = adapter_base_model(adapter)
    stepflow_card = Path(adapter) / MODEL_CARD
    if stepflow_card.is_file() and expected_base is not None:
        trained_on = json.loads(stepflow_card.read_text()).get("base_model")
        if trained_on is not None and trained_on != expected_base:
            raise ValueError(
                f"{adapter}: adapter was trained on base model {trained_on!r}, "
                f"not {expected_base!r}"
            )
    try:
        return PeftModel.from_pretrained(lm, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{adapter}: adapter does not fit base model {expected_base!r} "
            f"(adapter records {recorded!r}): {exc}"
        ) from exc


def prepare_for_training(params: Params):
    """The student of params.yaml ready to train (`training.method`): QLoRA's 4-bit base
    prepared for k-bit training and LoRA on top, LoRA on the full-precision base, or the
    whole model; seeded with `params.seed`, without a KV cache."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

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
