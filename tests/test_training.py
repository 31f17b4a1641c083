"""Training on partially masked trajectories with the real embedded model (LoRA, the CPU
default, and QLoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from stepflow.config import load_params
from stepflow.data.trajectory import write_trajectories
from stepflow.method import VARIANTS
from stepflow.train.examples import build_examples
from stepflow.train.metering import trained_logits_only
from stepflow.train.modeling import (
    cpu_has_native_bf16,
    device,
    load_model,
    load_tokenizer,
    training_method,
)
from stepflow.train.runs import last_checkpoint, variant_files
from stepflow.train.sft import (
    _training_args,
    batch_collator,
    train_variant,
    training_prompt_budget,
)
from tests.sample_trajectories import (
    golden_find_non_living,
    golden_lifespan,
    reflected_find_non_living,
    sample_set,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run torch on one thread: on a shared 2-core machine, two OpenMP threads wait for each
    other at every op whenever another process holds a core (measured 5x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def workspace(tmp_path: Path, params_file: Path, monkeypatch) -> Path:
    """A scratch run directory with the three data files of the training variants."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    write_trajectories(data / "golden_d1.jsonl", [golden_find_non_living(0), golden_lifespan(1)])
    write_trajectories(data / "golden_d2.jsonl", [golden_find_non_living(3)])
    write_trajectories(data / "reflected.jsonl", [reflected_find_non_living(2)])
    return tmp_path


def tiny_params(params_file: Path, **overrides):
    """params.yaml with a tiny, fast training section."""
    values = {
        "training.lora.r": 8,
        "training.lora.alpha": 16,
        "training.lora.dropout": 0.0,
        "training.batch_size": 1,
        "training.gradient_accumulation_steps": 1,
        "training.max_seq_len": 512,
        "training.logging_steps": 1,
        "training.warmup_ratio": 0.0,
    }
    values.update({f"training.{key}": value for key, value in overrides.items()})
    return load_params(params_file, values)


def mean_loss(model, examples: list[dict]) -> float:
    """Token-level cross-entropy over exactly the trained tokens of a list of examples,
    computed here from the logits: the sum of -log p(token | the tokens before) over every
    position whose label is not -100, divided by their count (one forward per example)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            trained = targets != -100
            log_probs = torch.log_softmax(logits[trained].float(), dim=-1)
            total -= float(log_probs.gather(1, targets[trained][:, None]).sum())
            count += int(trained.sum())
    assert count > 0, "no trained token in the examples"
    return total / count


def greedy(model, tokenizer, trajectory, new_tokens: int = 24) -> str:
    """Greedy continuation of a trajectory's system prompt and instruction."""
    messages = [{"role": t.role, "content": t.content} for t in trajectory.turns[:2]]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_variant_table_and_missing_data(params_file: Path, tmp_path: Path) -> None:
    assert set(VARIANTS) == {"init_sft", "golden", "step", "step_nomask"}
    assert VARIANTS["step"].files == VARIANTS["step_nomask"].files
    assert VARIANTS["step"].mask_erroneous and not VARIANTS["step_nomask"].mask_erroneous
    params = load_params(params_file, {"paths.data": str(tmp_path / "nothing")})
    with pytest.raises(FileNotFoundError, match=r"golden_d1\.jsonl"):
        variant_files(params, "init_sft")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_files(params, "golden_d3")


def test_padding_free_batch_equals_padded_batch(tokenizer) -> None:
    """Concatenated trajectories (restarting position ids, no mask) see no other trajectory."""
    examples, _ = build_examples(sample_set(), tokenizer, max_seq_len=512)
    model = load_model("embedded")
    model.config.use_cache = False  # as in training; with a KV cache the packing is not seen
    flat = batch_collator("padding_free", tokenizer)(examples)
    padded = batch_collator("none", tokenizer)(examples)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert "attention_mask" not in flat
    assert padded["input_ids"].shape[0] == len(examples)
    with torch.no_grad():
        loss_flat = model(**flat).loss
        loss_padded = model(**padded).loss
    assert torch.allclose(loss_flat, loss_padded, atol=1e-4), (loss_flat, loss_padded)


@pytest.mark.parametrize("packing", ["padding_free", "none"])
def test_lm_head_on_trained_positions_only_keeps_loss_and_gradients(tokenizer, packing) -> None:
    """Training computes the LM head only where the next token is trained: same loss (same
    sum, same count) and same gradients as the full logits, packed or padded."""
    examples, _ = build_examples(sample_set(), tokenizer, max_seq_len=512)
    batch = batch_collator(packing, tokenizer)(examples)
    trimmed = trained_logits_only(batch)
    trained = int((batch["labels"][..., 1:] != -100).sum())
    assert 0 < int(trimmed["logits_to_keep"].sum()) == trained < batch["input_ids"].numel() / 2
    model = load_model("embedded")
    model.config.use_cache = False
    # gradients of the last layer and the final norm: the backward pass stops there
    model.requires_grad_(False)
    watched = [model.model.layers[-1].mlp.up_proj.weight, model.model.norm.weight]
    for weight in watched:
        weight.requires_grad_(True)
    count = torch.tensor(trained)
    losses, grads = [], []
    for inputs in (batch, trimmed):
        model.zero_grad()
        out = model(**inputs, num_items_in_batch=count)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([weight.grad.clone() for weight in watched])
    assert out.logits.shape == (trained, model.config.vocab_size)
    assert torch.allclose(losses[1], losses[0], rtol=1e-5), losses
    for trimmed_grad, full_grad in zip(grads[1], grads[0], strict=True):
        assert full_grad.abs().sum() > 0
        assert torch.allclose(trimmed_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_masked_and_unmasked_losses_differ(tokenizer) -> None:
    trajectory = reflected_find_non_living()
    (masked,), _ = build_examples([trajectory], tokenizer, max_seq_len=512)
    (unmasked,), _ = build_examples([trajectory], tokenizer, max_seq_len=512, mask_erroneous=False)
    assert masked["input_ids"] == unmasked["input_ids"]
    assert masked["labels"] != unmasked["labels"]
    model = load_model("embedded")
    collate = batch_collator("padding_free", tokenizer)
    with torch.no_grad():
        loss_masked = float(model(**collate([masked])).loss)
        loss_unmasked = float(model(**collate([unmasked])).loss)
    assert abs(loss_masked - loss_unmasked) > 1e-3, (loss_masked, loss_unmasked)


@pytest.mark.slow
def test_qlora_run_lowers_loss_and_adapter_changes_generation(
    workspace: Path, params_file: Path
) -> None:
    import mlflow

    params = tiny_params(
        params_file, method="qlora", max_steps=8, learning_rate=3e-3, save_steps=100
    )
    tokenizer = load_tokenizer("embedded")
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    try:
        mlflow.set_experiment("training-test")
        with mlflow.start_run() as run:
            result = train_variant(params, "init_sft")
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        client = mlflow.MlflowClient()
        tps = client.get_metric_history(run.info.run_id, "train/tokens_per_second")
        fraction = client.get_metric_history(run.info.run_id, "data/trained_fraction")
    finally:
        mlflow.set_tracking_uri(previous_uri)

    # the run: 8 steps on D1 only, losses logged to the caller's MLflow run
    assert result.global_step == 8
    assert result.output_dir == Path("models/init_sft")
    assert result.stats.kept == 2 and result.stats.trained_tokens > 0
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert tps and all(m.value > 0 for m in tps)
    assert [m.value for m in fraction] == [pytest.approx(result.stats.trained_fraction, abs=1e-5)]

    # the artifact: a LoRA adapter with its card, written atomically
    out = workspace / "models" / "init_sft"
    card = json.loads((out / "stepflow.json").read_text())
    assert card["base_model"] == "embedded" and card["variant"] == "init_sft"
    assert card["training"]["method"] == "qlora"
    assert card["masking"] == "partial" and card["global_step"] == 8
    assert [d["file"] for d in card["data"]] == ["golden_d1.jsonl"]
    assert len(card["data"][0]["sha256"]) == 64
    assert card["training"]["lora"]["r"] == 8
    assert card["token_stats"]["trained_tokens"] == result.stats.trained_tokens
    assert card["final_loss"] == pytest.approx(losses[-1])
    longest = result.stats.max_trained_turn_tokens
    assert card["max_trained_turn_tokens"] == longest > 0
    assert (out / "README.md").read_text().startswith("---")
    assert f"longest trained assistant turn: {longest} tokens" in (out / "README.md").read_text()
    assert (out / "adapter_config.json").is_file()
    assert [p.name for p in (workspace / "models").iterdir()] == ["init_sft"]

    # the adapter loads on the base model, lowers the loss and changes greedy decoding
    examples, _ = build_examples(
        [golden_find_non_living(0), golden_lifespan(1)], tokenizer, max_seq_len=512
    )
    base = load_model("embedded", method="qlora")
    before = mean_loss(base, examples)
    base_text = greedy(base, tokenizer, golden_find_non_living(0))
    del base
    tuned = load_model("embedded", method="qlora", adapter=out)
    after = mean_loss(tuned, examples)
    tuned_text = greedy(tuned, tokenizer, golden_find_non_living(0))
    assert after < 0.8 * before, (before, after)
    assert tuned_text != base_text, tuned_text


def test_cpu_defaults_train_lora_with_native_bf16_matmuls(params_file: Path, tmp_path) -> None:
    """params.yaml's training section on this CPU: LoRA (QLoRA is the GPU method), no
    gradient checkpointing, bf16 autocast exactly where the CPU multiplies bf16 natively."""
    params = load_params(params_file)
    assert device() == "cpu", "this test describes the CPU defaults"
    cfg = params.training
    assert (cfg.method, cfg.compute_dtype, cfg.gradient_checkpointing) == ("auto", "auto", False)
    assert training_method(cfg.method) == "lora"
    args = _training_args(params, tmp_path)
    assert args.bf16 == cpu_has_native_bf16() and not args.fp16
    assert not args.activation_checkpointing
    forced = load_params(params_file, {"training.compute_dtype": "float32"})
    assert not _training_args(forced, tmp_path).bf16
    assert training_method("qlora") == "qlora" and training_method("full") == "full"


class CheckpointingSeen(TrainerCallback):
    """Records whether the trained model recomputes activations in the backward pass."""

    def __init__(self) -> None:
        self.active: bool | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.active = model.get_base_model().is_activation_checkpointing


@pytest.mark.slow
def test_gradient_checkpointing_changes_no_loss(workspace: Path, params_file: Path) -> None:
    """Checkpointing off (the CPU default) trains exactly what checkpointing on trains: same
    losses and adapter, LoRA dropout included (its random state is replayed on recompute)."""
    from safetensors.torch import load_file

    losses, adapters = {}, {}
    for checkpointing in (False, True):
        params = tiny_params(
            params_file,
            gradient_checkpointing=checkpointing,
            max_steps=2,
            learning_rate=1e-3,
            save_steps=100,
            **{"lora.dropout": 0.05},
        )
        seen = CheckpointingSeen()
        out = workspace / f"checkpointing-{checkpointing}"
        result = train_variant(params, "init_sft", resume=False, out_dir=out, callbacks=[seen])
        assert seen.active is checkpointing
        losses[checkpointing] = [e["loss"] for e in result.log_history if "loss" in e]
        adapters[checkpointing] = load_file(out / "adapter_model.safetensors")
    assert len(losses[False]) == 2 and losses[False][0] != losses[False][1]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6, abs=0)
    assert adapters[True].keys() == adapters[False].keys() and adapters[False]
    for name, weight in adapters[False].items():
        assert torch.allclose(adapters[True][name], weight, rtol=1e-5, atol=1e-7), name


class Interrupt(RuntimeError):
    """Stands for a crash in the middle of training."""


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"crash at step {state.global_step}")


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_interrupted_run_resumes_from_last_checkpoint(workspace: Path, params_file: Path) -> None:
    params = tiny_params(params_file, max_steps=4, save_steps=2, learning_rate=1e-3)
    with pytest.raises(Interrupt):
        train_variant(params, "step", callbacks=[CrashAt(3)])
    (work_dir,) = (workspace / ".stepflow" / "work").iterdir()
    assert work_dir.name.startswith("train-step-")
    assert last_checkpoint(work_dir / "checkpoints").name == "checkpoint-2"
    assert not (workspace / "models" / "step").exists()

    recorder = StepRecorder()
    result = train_variant(params, "step", callbacks=[recorder])
    assert result.resumed_from == "checkpoint-2"
    assert recorder.steps == [3, 4]
    assert result.global_step == 4
    assert [e["step"] for e in result.log_history if "loss" in e] == [1, 2, 3, 4]
    assert result.work_dir.resolve() == work_dir
    card = json.loads((workspace / "models" / "step" / "stepflow.json").read_text())
    assert card["global_step"] == 4 and card["masking"] == "partial"
    assert card["token_stats"]["per_kind_masked_turns"] == {"erroneous_step": 2}

    # the resumed run is the run that was never interrupted (same batches, same updates)
    fresh = train_variant(params, "step", resume=False, out_dir=workspace / "fresh")
    assert fresh.resumed_from is None
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert [e["loss"] for e in fresh.log_history if "loss" in e] == pytest.approx(losses, rel=1e-4)


def test_train_cli_reports_problems(params_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    args = ["--params", str(params_file), "-S", f"paths.data={tmp_path / 'none'}"]
    unknown = runner.invoke(app, ["train", "golden_d3", *args])
    assert unknown.exit_code == 2 and "unknown variant" in unknown.output
    missing = runner.invoke(app, ["train", "step", *args])
    assert missing.exit_code == 2 and "reflected.jsonl" in missing.output


@pytest.mark.slow
@pytest.mark.parametrize(("method", "learning_rate"), [("lora", 1e-3), ("full", 1e-4)])
def test_lora_and_full_methods_train_and_save(
    workspace: Path, params_file: Path, method: str, learning_rate: float
) -> None:
    """One batch holds the variant's three trajectories: the loss reported for the first
    step is the base model's token-level cross-entropy over exactly their trained tokens,
    and the saved model's is lower by more than 15% after two steps."""
    params = tiny_params(
        params_file,
        method=method,
        max_steps=2,
        learning_rate=learning_rate,
        batch_size=3,
        compute_dtype="float32",
    )
    result = train_variant(params, "golden")
    assert result.global_step == 2 and result.stats.kept == 3
    out = workspace / "models" / "golden"
    card = json.loads((out / "stepflow.json").read_text())
    assert card["training"]["method"] == method
    assert [d["file"] for d in card["data"]] == ["golden_d1.jsonl", "golden_d2.jsonl"]

    trajectories = [golden_find_non_living(0), golden_lifespan(1), golden_find_non_living(3)]
    examples, stats = build_examples(
        trajectories,
        load_tokenizer("embedded"),
        max_seq_len=params.training.max_seq_len,
        prompt_budget=training_prompt_budget(params),
    )
    assert stats.trained_tokens == result.stats.trained_tokens  # the data the run trained on
    before = mean_loss(load_model("embedded"), examples)
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert card["losses"] == [[1, losses[0]], [2, losses[1]]]
    assert losses[0] == pytest.approx(before, rel=1e-4), (losses, before)

    if method == "lora":
        assert card["artifact"] == "lora_adapter"
        model = load_model("embedded", adapter=out)
    else:
        assert card["artifact"] == "full_model"
        assert not (out / "adapter_config.json").exists()
        model = load_model(str(out))
        assert model.config.use_cache
    after = mean_loss(model, examples)
    assert losses[1] < losses[0] and after < 0.85 * before, (losses, before, after)


def test_only_stale_runs_for_the_same_output_are_pruned(tmp_path: Path) -> None:
    """Another seed of a study trains the same variant for other outputs at the same time:
    its checkpoints are not an earlier run of this one."""
    from stepflow.train.runs import TARGET_FILE, prune_stale_runs

    def run(key: str, target: str | None) -> Path:
        path = tmp_path / f"train-golden-{key}"
        (path / "checkpoints").mkdir(parents=True)
        if target is not None:
            (path / TARGET_FILE).write_text(target)
        return path

    current = run("aaaa", "/study/seed-0/models/golden")
    earlier = run("bbbb", "/study/seed-0/models/golden")
    other_seed = run("cccc", "/study/seed-1/models/golden")
    unmarked = run("dddd", None)
    other_variant = tmp_path / "train-golden-step-eeee"  # not a run of `golden`
    other_variant.mkdir()
    prune_stale_runs(current)
    assert not earlier.exists()
    assert current.exists() and other_seed.exists() and unmarked.exists()
    assert other_variant.exists()
