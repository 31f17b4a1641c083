"""The embedded SmolLM2 model: materialised once, loads fast, chats, trains with QLoRA on CPU."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from stepflow.llm.embedded import EMBEDDED_DIRNAME, embedded_model_dir, resolve_model
from stepflow.train.modeling import load_model, load_tokenizer


def test_embedded_dir_is_a_plain_safetensors_model(embedded_dir: Path) -> None:
    assert (embedded_dir / "model.safetensors").is_file()
    config = (embedded_dir / "config.json").read_text()
    assert "quantization_config" not in config
    assert embedded_model_dir() == embedded_dir
    assert resolve_model("embedded") == str(embedded_dir)


def test_generates_with_chat_template(embedded_dir) -> None:
    tokenizer = load_tokenizer("embedded")
    model = load_model("embedded")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def _materialise(cache: str, queue) -> None:
    queue.put(str(embedded_model_dir(Path(cache))))


@pytest.mark.slow
def test_concurrent_materialisation_is_atomic(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_materialise, args=(str(tmp_path), queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / EMBEDDED_DIRNAME)}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != EMBEDDED_DIRNAME]
    assert leftovers == []
    tokenizer = load_tokenizer(str(tmp_path / EMBEDDED_DIRNAME))
    assert tokenizer.eos_token == "<|im_end|>"


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model path does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_qlora_forward_backward_on_cpu(embedded_dir) -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_model("embedded", method="qlora")
    linear = model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    assert linear.weight.quant_type == "nf4"
    assert linear.weight.quant_state.nested  # double quantization
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(loss)
