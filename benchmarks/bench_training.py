"""Training throughput: tokens/s and fraction of the machine's matmul peak, per configuration.

Each configuration trains the same short run (same data, seed and steps, so the same
trajectories in the same order) through `stepflow.train.sft.train_variant`; configurations
are interleaved (A B C A B C ...) so that a shared machine's load falls on all of them alike,
and each one's figure is the median over `--repeats`. The matmul peak of every dtype the
configurations compute in (benchmarks/bench_matmul.py) is measured between rounds.

Suites:
- `speed` (default): the defaults before and after the CPU speed work and the steps in
  between, one change at a time (QLoRA -> LoRA, checkpointing off, bf16 matmuls, the LM head
  only where a token is trained), on the default model, params.yaml's training section and
  trajectories shaped like ScienceWorld golden ones (~800 tokens, ~15% of them trained).
  Writes benchmarks/results/training.json.
- `packing`: padding-free packing vs length grouping vs padding (QLoRA fp32, batches of 4
  trajectories of up to 512 tokens). Writes benchmarks/results/training_packing.json.
- `threads`: params.yaml on one thread vs one thread per core, same data as `speed`.
  Writes benchmarks/results/training_threads.json.

Model FLOPs per trained token, N = weights the model multiplies by (every linear layer and
the LM head; 134.5M for SmolLM2-135M), N_a = trainable adapter weights:
- LoRA and QLoRA (frozen base): 4N + 6N_a -- forward 2N, backward through the activations
  2N (no weight gradients of the base), forward + both backward products of the adapters 6N_a;
- full fine-tuning: 6N.
Attention's score products are not counted (they are reported apart as `attention_share`),
nor is recomputation under gradient checkpointing, nor 4-bit dequantization, and the LM head
counts on every position even where it is skipped: the yardstick is the same for every
configuration, so fractions of peak compare like tokens/s do.

    python benchmarks/bench_training.py [--suite speed|packing|threads] [--steps 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from stepflow.config import load_params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.trajectory import Provenance, Trajectory, Turn, write_trajectories
from stepflow.provenance import code_version, utc_now
from stepflow.train import metering, sft
from stepflow.train.modeling import compute_dtype, training_method

try:
    from benchmarks.bench_matmul import machine, machine_load, peak_flops
except ModuleNotFoundError:  # run as a script: its directory is on the path
    from bench_matmul import machine, machine_load, peak_flops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# configurations: overrides of params.yaml; FULL_LOGITS: the LM head on every position, as
# before `stepflow.train.metering.trained_logits_only`
FULL_LOGITS = "lm_head_on_all_positions"
BEFORE = {  # the defaults before: QLoRA, gradient checkpointing, fp32 matmuls
    "training.method": "qlora",
    "training.gradient_checkpointing": True,
    "training.compute_dtype": "float32",
    FULL_LOGITS: True,
}
SUITES: dict[str, dict[str, dict]] = {
    "speed": {  # from before to after, one change at a time
        "before": BEFORE,
        "qlora_no_checkpointing": {**BEFORE, "training.gradient_checkpointing": False},
        "lora_fp32": {
            "training.method": "lora",
            "training.gradient_checkpointing": False,
            "training.compute_dtype": "float32",
            FULL_LOGITS: True,
        },
        "lora_bf16": {FULL_LOGITS: True},
        "after": {},  # params.yaml: LoRA on a CPU, no checkpointing, bf16 matmuls here
    },
    "threads": {  # params.yaml with one thread (its setting) and with one per core
        "after": {},
        "after_all_cores": {"training.threads": None},
    },
    "packing": {
        mode: {
            **BEFORE,
            "training.packing": mode,
            "training.batch_size": 4,
            "training.max_seq_len": 512,
            "training.lora.r": 8,
        }
        for mode in ("padding_free", "length_grouped", "none")
    },
}
RUN = {  # every run: one trajectory per step, nothing saved, every step logged
    "training.gradient_accumulation_steps": 1,
    "training.save_steps": 10_000,
    "training.logging_steps": 1,
}
BASELINE = {"speed": "before", "packing": "none", "threads": "after"}

SYSTEM = (
    "You are a helpful agent that solves tasks in ScienceWorld, a text-based science "
    "simulator. You see an observation, then you choose one action.\n\nAvailable actions "
    "(OBJ and LOC are object and location names from your observations):\nopen OBJ, close "
    "OBJ, activate OBJ, deactivate OBJ, connect OBJ to OBJ, disconnect OBJ,\nuse OBJ on OBJ, "
    "look around, look at OBJ, look in OBJ, read OBJ, move OBJ to OBJ,\npick up OBJ, put down "
    "OBJ, pour OBJ in OBJ, dunk OBJ in OBJ, mix OBJ, go to LOC,\nteleport to LOC, eat OBJ, "
    'flush OBJ, focus on OBJ, wait, wait1, inventory, task.\n\n"focus on OBJ" signals your '
    "answer: focus only on the object the task asks for.\nReply in exactly this format, one "
    "action per turn:\nThought: <a short reasoning step>\nAction: <one action>"
)
OBJECTS = [
    "a substance called air",
    "a chair. On the chair is: nothing.",
    "a counter. On the counter is: a bowl (containing a red apple, a banana, an orange)",
    "a cupboard. The cupboard door is closed.",
    "a freezer. The freezer door is closed.",
    "a fridge. The fridge door is closed.",
    "a glass jar (containing a substance called sodium chloride)",
    "a lighter",
    "an oven, which is turned off. The oven door is closed.",
    "a painting",
    "a sink, which is turned off. In the sink is: nothing.",
    "a table. On the table is: a glass cup (containing nothing)",
    "a thermometer, currently reading a temperature of 10 degrees celsius",
    "a battery",
    "a yellow box (containing nothing)",
    "a workbench. On the workbench is: a wire, a light bulb, which is off.",
]
ROOMS = ["kitchen", "workshop", "hallway", "outside", "greenhouse", "bathroom", "art studio"]


def room_description(rng: random.Random, room: str) -> str:
    """A ScienceWorld-style `look around` observation (~150 tokens)."""
    things = "\n\t".join(["the agent", *rng.sample(OBJECTS, rng.randint(8, 12))])
    door = rng.choice([r for r in ROOMS if r != room])
    return (
        f"This room is called the {room}. In it, you see: \n\t{things}\n"
        f"You also see:\n\tA door to the {door} (that is open)"
    )


def golden_like(rng: random.Random, variation: int, long: bool) -> Trajectory:
    """A golden-like trajectory: `long` ones (~800 tokens, 5-7 steps, a room described
    every other step) are shaped like ScienceWorld's; short ones have brief observations."""
    room = rng.choice(ROOMS)
    instruction = (
        "Your task is to find a(n) non-living thing. First, focus on the thing. "
        f"Then, move it to the yellow box in the {room}."
    )
    first = room_description(rng, rng.choice(ROOMS)) if long else f"You are in the {room}."
    turns = [
        Turn(role="system", kind="system", content=SYSTEM if long else SYSTEM[:120]),
        Turn(role="user", kind="instruction", content=f"Task: {instruction}\nObservation: {first}"),
    ]
    steps = rng.randint(5, 7) if long else rng.randint(1, 8)
    for i in range(steps):
        place = rng.choice(ROOMS)
        turns.append(
            Turn(
                role="assistant",
                kind="step",
                loss=True,
                content=f"Thought: the thing I need may be in the {place}, so I go there.\n"
                f"Action: go to {place}",
            )
        )
        seen = (
            room_description(rng, place)
            if long and i % 2 == 1
            else f"You move to the {place}. In it, you see: {rng.choice(OBJECTS)}."
        )
        turns.append(Turn(role="user", kind="observation", content=f"Observation: {seen}"))
    return Trajectory(
        env="scienceworld",
        task_type="find-non-living-thing",
        variation=variation,
        split="u1",
        instruction=instruction,
        turns=turns,
        reward=1.0,
        score=100.0,
        success=True,
        num_steps=steps,
        provenance=Provenance(source="golden"),
    )


class LogClock(TrainerCallback):
    """The time of every log (one per step with logging_steps 1), to weigh step rates."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "tokens_per_second" in logs:
            self.times.append(time.perf_counter())


def model_flops(params_path: Path) -> dict:
    """N, N_a and the model FLOPs per token of each method (see the module docstring)."""
    from stepflow.train.modeling import prepare_for_training

    params = load_params(params_path, {"training.method": "lora"})
    model = prepare_for_training(params)
    base = model.get_base_model()
    n = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    n -= sum(p.numel() for p in model.parameters() if p.requires_grad)  # LoRA's own Linears
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = 4 * n + 6 * adapter
    return {
        "n": n,
        "n_adapter": adapter,
        "flops_per_token": {"qlora": lora, "lora": lora, "full": 6 * n},
    }


def run(name: str, config: dict, common: dict, params_path: Path, workdir: Path) -> dict:
    """One short training run of a configuration; its throughput figures."""
    overrides = {key: value for key, value in config.items() if key != FULL_LOGITS}
    params = load_params(params_path, {**RUN, **overrides, **common})
    clock = LogClock()
    load_before = machine_load()
    trim = metering.trained_logits_only
    if config.get(FULL_LOGITS):
        metering.trained_logits_only = lambda inputs: inputs
    try:
        began = time.perf_counter()
        result = sft.train_variant(
            params,
            "init_sft",
            work_root=workdir / "work",
            resume=False,
            out_dir=workdir / name,
            callbacks=[clock],
        )
        wall = time.perf_counter() - began
    finally:
        metering.trained_logits_only = trim
    logs = [entry for entry in result.log_history if "tokens_per_second" in entry]
    seconds = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    steps = params.training.max_steps
    assert len(seconds) == len(logs) == steps, (len(seconds), len(logs), steps)
    tokens = [entry["tokens_per_second"] * dt for entry, dt in zip(logs, seconds, strict=True)]
    # the first step also pays one-off costs (allocation, kernel choice): the steady rate is
    # over the others
    steady = sum(tokens[1:]) / sum(seconds[1:]) if steps > 1 else tokens[0] / seconds[0]
    return {
        "tokens_per_second": round(steady, 2),
        "tokens_per_second_all_steps": round(result.tokens_per_second, 2),
        "seconds_per_step": round(result.train_seconds / result.global_step, 3),
        "padding_fraction": round(statistics.mean(e["padding_fraction"] for e in logs), 4),
        "losses": [e["loss"] for e in result.log_history if "loss" in e],
        "threads": params.training.threads or torch.get_num_threads(),
        "method": training_method(params.training.method),
        "compute_dtype": str(
            compute_dtype(params.training.compute_dtype, params.student.dtype)
        ).removeprefix("torch."),
        "gradient_checkpointing": params.training.gradient_checkpointing,
        "lm_head": "all positions" if config.get(FULL_LOGITS) else "trained positions",
        "wall_seconds_with_load": round(wall, 2),
        "load_average_1_5_15": [load_before, machine_load()],
    }


def attention_share(data: list[Trajectory], params_path: Path, flops_per_token: int) -> float:
    """Causal attention-score FLOPs (QK^T and AV, forward and backward: 6 L d n(n+1) for a
    trajectory of n tokens) over the counted model FLOPs, on this data."""
    from transformers import AutoConfig

    from stepflow.llm.embedded import resolve_model
    from stepflow.train.examples import build_examples
    from stepflow.train.modeling import load_tokenizer

    params = load_params(params_path)
    config = AutoConfig.from_pretrained(resolve_model(params.student.model))
    examples, _ = build_examples(
        data, load_tokenizer(params.student.model), max_seq_len=params.training.max_seq_len
    )
    lengths = [len(e["input_ids"]) for e in examples]
    width = config.num_attention_heads * config.head_dim
    attention = sum(6 * config.num_hidden_layers * width * n * (n + 1) for n in lengths)
    return attention / (flops_per_token * sum(lengths))


def main() -> None:
    """Run the suite's configurations `--repeats` times, interleaved; report medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="speed")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the suite")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="training.threads of all")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()
    configs = SUITES[args.suite]
    if args.configs:
        configs = {name: configs[name] for name in args.configs.split(",")}
    default_threads = torch.get_num_threads()

    rng = random.Random(0)
    data = [golden_like(rng, i, long=args.suite != "packing") for i in range(args.trajectories)]
    workdir = Path(tempfile.mkdtemp(prefix="stepflow-bench-"))
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    peaks: dict[str, list[float]] = {}
    loads = [machine_load()]
    began = time.perf_counter()
    try:
        write_trajectories(workdir / "data" / "golden_d1.jsonl", data)
        common = {
            "paths.data": str(workdir / "data"),
            "paths.models": str(workdir / "models"),
            "training.max_steps": args.steps,
            **({"training.threads": args.threads} if args.threads else {}),
        }
        for _ in range(args.repeats):
            for name, config in configs.items():
                runs[name].append(run(name, config, common, args.params, workdir))
                print(name, runs[name][-1], file=sys.stderr, flush=True)
            thread_counts = sorted({r[-1]["threads"] for r in runs.values()})
            for threads in thread_counts:  # the peak, under the load of this round
                torch.set_num_threads(threads)
                for dtype in ("float32", "bfloat16"):
                    key = f"{dtype}/threads_{threads}"
                    peaks.setdefault(key, []).append(peak_flops(getattr(torch, dtype)))
            torch.set_num_threads(default_threads)
            loads.append(machine_load())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    flops = model_flops(args.params)

    peak = {key: max(values) for key, values in peaks.items()}
    summary = {}
    for name, results in runs.items():
        first = results[0]
        tps = statistics.median(r["tokens_per_second"] for r in results)
        achieved = tps * flops["flops_per_token"][first["method"]]
        threads = first["threads"]
        summary[name] = {
            "method": first["method"],
            "compute_dtype": first["compute_dtype"],
            "gradient_checkpointing": first["gradient_checkpointing"],
            "lm_head": first["lm_head"],
            "threads": threads,
            "tokens_per_second": round(tps, 2),
            "tokens_per_second_runs": [r["tokens_per_second"] for r in results],
            "model_gflops": round(achieved / 1e9, 2),
            "fraction_of_peak": round(
                achieved / peak[f"{first['compute_dtype']}/threads_{threads}"], 4
            ),
            "fraction_of_bf16_peak": round(achieved / peak[f"bfloat16/threads_{threads}"], 4),
            "losses": first["losses"],
        }
    baseline = BASELINE[args.suite]
    if baseline in summary:
        for row in summary.values():
            row["speedup"] = round(
                row["tokens_per_second"] / summary[baseline]["tokens_per_second"], 3
            )
    report = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": {**machine(), "torch_threads_default": default_threads},
        "suite": args.suite,
        "setup": {
            "model": load_params(args.params).student.model,
            "configs": configs,
            "baseline": baseline,
            "steps": args.steps,
            "repeats": args.repeats,
            "trajectories": args.trajectories,
            "tokens_per_second": "median over the repeats of each run's steady rate "
            "(real tokens / seconds over steps 2..n)",
            "model_flops_per_token": "LoRA and QLoRA 4N + 6N_a, full 6N (module docstring)",
        },
        "model_flops": flops,
        "attention_share": round(
            attention_share(data, args.params, flops["flops_per_token"]["lora"]), 4
        ),
        "peak_gflops": {key: round(v / 1e9, 2) for key, v in peak.items()},
        "peak_gflops_median": {k: round(statistics.median(v) / 1e9, 2) for k, v in peaks.items()},
        "summary": summary,
        "runs": runs,
        "load_average_1_5_15": loads,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "note": "the cores were shared with other processes (load averages above): "
        "configurations interleaved, medians reported; a peak is the best matmul burst",
    }
    name = "training.json" if args.suite == "speed" else f"training_{args.suite}.json"
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    print(path)
    for name, row in summary.items():
        print(
            f"{name:>24}: {row['tokens_per_second']:7.1f} tokens/s, {row['model_gflops']:6.1f} "
            f"GFLOP/s = {row['fraction_of_peak']:.1%} of the {row['compute_dtype']} peak "
            f"on {row['threads']} thread(s), x{row.get('speedup', 1):.2f}"
        )
    print("load average during the run:", loads)


if __name__ == "__main__":
    main()
