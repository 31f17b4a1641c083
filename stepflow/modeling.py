"""Loading tokenizers and causal LMs: full precision, LoRA, or 4-bit QLoRA; optional adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stepflow.embedded import resolve_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Method = Literal["qlora", "lora", "full"]


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


def torch_dtype(name: str) -> torch.dtype:
    """Map a params.yaml dtype name to a torch dtype ('auto': bf16 on GPU, fp32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device() == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad token set when the model has none."""
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
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    kwargs: dict = {"dtype": torch_dtype(dtype)}
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": placement()}
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if method != "qlora":
        lm.to(placement())
    if adapter is not None:
        lm = attach_adapter(lm, adapter, expected_base=model)
    return lm


def adapter_base_model(adapter: str | Path) -> str | None:
    """The base model recorded in an adapter directory, if any."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    return json.loads(config.read_text()).get("base_model_name_or_path")


def attach_adapter(lm: PreTrainedModel, adapter: str | Path, expected_base: str | None = None):
    """Wrap `lm` with a saved LoRA adapter, checking it was trained on a compatible base."""
    from peft import PeftModel

    recorded = adapter_base_model(adapter)
    stepflow_card = Path(adapter) / "stepflow.json"
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
