"""Rollout speed of a trained agent on each backend, on the same instances, greedy.

A study seed's `init_sft` adapter (`stepflow study run` trains it) runs the same episodes on:
- `local`: the transformers backend in fp32 (the default on a CPU), requests batched, KV
  caches kept across turns and shared prefixes across episodes;
- `local-bf16`: the same in bf16 (`student.dtype: bfloat16`);
- `vllm`: the vLLM CPU server of `serving:` (bf16, prefix caching, continuous batching),
  the adapter loaded at run time as evaluation does.
Each reports steps/s, success, and how many episodes took the same actions as `local`.

    python benchmarks/bench_agent_backends.py [-p params.study.yaml] [--seed 0] \
        [--episodes 16] [--backends local,local-bf16,vllm]

Writes benchmarks/results/agent_backends.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from stepflow.config import LLMConfig, Params, load_params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.splits import load_manifest
from stepflow.data.trajectory import read_trajectories
from stepflow.evaluate.evaluation import greedy
from stepflow.llm.served_adapters import with_adapter
from stepflow.llm.serving import start_server, stop_server
from stepflow.provenance import code_version, utc_now
from stepflow.rollout.job import RolloutJob
from stepflow.study.seeds import seed_overrides

try:
    from benchmarks.bench_matmul import machine, machine_load
except ImportError:  # run as a script
    from bench_matmul import machine, machine_load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "agent_backends.json"


def student_for(
    backend: str, params: Params, adapter: Path, base_url: str | None
) -> tuple[LLMConfig, Path | None]:
    """The student config (and local adapter) of one backend."""
    student = greedy(params.student)
    if backend == "local":
        return student.model_copy(update={"dtype": "float32"}), adapter
    if backend == "local-bf16":
        return student.model_copy(update={"dtype": "bfloat16"}), adapter
    served = LLMConfig.model_validate(
        {
            **student.model_dump(),
            "backend": "openai",
            "endpoint": {
                "base_url": base_url,
                "model": params.serving.served_model_name,
                "api_key_env": None,
                "concurrency": params.rollout.concurrency * 2,
            },
        }
    )
    return with_adapter(served, "init_sft", adapter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--params", type=Path, default=Path("params.study.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--backends", default="local,local-bf16,vllm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    study = load_params(args.params)
    params = load_params(args.params, seed_overrides(study, args.seed))
    adapter = Path(params.paths.models) / "init_sft"
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{adapter}: no init_sft adapter; run `stepflow study run -p {args.params}` first")
    manifest = load_manifest(Path(params.paths.data) / "manifest.json")
    # training instances of U1 the agent was trained on: the benchmark measures speed, and
    # never touches the test split
    instances = sorted(manifest.select("u1"))[::5][: args.episodes]
    results: dict = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": machine(),
        "load_average_1_5_15": machine_load(),
        "params": str(args.params),
        "seed": args.seed,
        "agent": "init_sft",
        "instances": [i.key for i in instances],
        "backends": {},
    }
    actions: dict[str, dict[str, list[str]]] = {}
    for backend in args.backends.split(","):
        server = None
        if backend == "vllm":
            started = time.perf_counter()
            server = start_server(params.serving, print)
            results["vllm_startup_s"] = round(time.perf_counter() - started, 1)
        try:
            base_url = server.base_url if server is not None else None
            student, local_adapter = student_for(backend, params, adapter, base_url)
            concurrency = params.rollout.concurrency * (2 if backend == "vllm" else 1)
            with tempfile.TemporaryDirectory() as tmp:
                output = Path(tmp) / "episodes.jsonl"
                started = time.perf_counter()
                summary = RolloutJob(
                    params,
                    instances,
                    output,
                    student=student,
                    adapter=local_adapter,
                    source="evaluation",
                    concurrency=concurrency,
                    progress=False,
                ).run()
                wall = time.perf_counter() - started
                trajectories = list(read_trajectories(output))
        finally:
            if server is not None:
                stop_server(params.serving)
        actions[backend] = {
            t.key: [turn.content for turn in t.assistant_turns()] for t in trajectories
        }
        reference = actions.get("local", actions[backend])
        results["backends"][backend] = {
            "concurrency": concurrency,
            "episodes": summary.episodes,
            "steps": summary.steps,
            "wall_s": round(wall, 1),
            "steps_per_s": round(summary.steps / wall, 3),
            "success": round(sum(t.success for t in trajectories) / len(trajectories), 3),
            "same_turns_as_local": sum(
                actions[backend].get(key) == turns for key, turns in reference.items()
            ),
        }
        print(backend, results["backends"][backend], flush=True)
    if "local" in results["backends"]:
        base = results["backends"]["local"]["steps_per_s"]
        results["speedup_over_local"] = {
            name: round(row["steps_per_s"] / base, 2) for name, row in results["backends"].items()
        }
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
