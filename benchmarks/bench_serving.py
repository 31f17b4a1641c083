"""Episodes per minute: the local transformers backend, sequential, vs vLLM with concurrent
episodes, on the same ScienceWorld instances.

    python benchmarks/bench_serving.py [--episodes 16] [--concurrency 16] [--steps 6]

(a) the embedded model in process (`LocalBackend`), one episode at a time;
(b) the same model behind `stepflow serve` (vLLM CPU; its own virtualenv, built on first
    use), `--concurrency` episodes at once through the OpenAI-compatible endpoint.
Server start-up is reported separately and not counted in (b)'s throughput. Writes
benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from stepflow.config import EndpointConfig, GenerationConfig, ServingConfig
from stepflow.data.jsonl import atomic_write_json
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.llm.base import ChatBackend
from stepflow.llm.endpoint import OpenAIBackend
from stepflow.llm.local import LocalBackend
from stepflow.llm.serving import engine_requirement, running_server
from stepflow.provenance import code_version, utc_now
from stepflow.rollout.engine import rollout
from stepflow.rollout.episode import EpisodeSettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
TASK = "find-non-living-thing"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    backend: ChatBackend, instances: list[TaskInstance], settings: EpisodeSettings, workers: int
) -> dict:
    """Run the episodes (fresh output file) and measure them."""

    async def go():
        try:
            return await rollout(
                instances,
                backend,
                Path(tmp) / "episodes.jsonl",
                env_factory=ScienceWorldEnv,
                settings=settings,
                concurrency=workers,
                progress=False,
            )
        finally:
            await backend.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = asyncio.run(go())
        wall = time.perf_counter() - started
    assert summary.episodes == len(instances), summary.errors
    return {
        "episodes": summary.episodes,
        "concurrency": workers,
        "steps": summary.steps,
        "completion_tokens": summary.completion_tokens,
        "wall_s": round(wall, 2),
        "episodes_per_min": round(summary.episodes / wall * 60, 3),
        "steps_per_s": round(summary.steps / wall, 3),
        "completion_tokens_per_s": round(summary.completion_tokens / wall, 2),
        "mean_reward": round(summary.mean_reward, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="step limit per episode")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-observation-chars", type=int, default=800)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    settings = EpisodeSettings(
        step_limit=args.steps, max_observation_chars=args.max_observation_chars
    )
    instances = [
        TaskInstance("scienceworld", TASK, v, "train") for v in range(1, args.episodes + 1)
    ]
    serving = ServingConfig(port=_free_port(), state_dir=Path(tempfile.mkdtemp()) / "serve")
    results: dict = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "model": "embedded (SmolLM2-135M-Instruct)",
        "engine": engine_requirement(serving),
        "task": TASK,
        "step_limit": args.steps,
        "max_new_tokens": args.max_new_tokens,
    }
    local = run(LocalBackend("embedded", generation=generation), instances, settings, 1)
    results["local_sequential"] = local
    print("local sequential", local, flush=True)
    started = time.perf_counter()
    with running_server(serving, say=print) as server:
        results["vllm_startup_s"] = round(time.perf_counter() - started, 1)
        endpoint = EndpointConfig(
            base_url=server.base_url,
            model=server.served_model_name,
            concurrency=args.concurrency,
        )
        served = run(OpenAIBackend(endpoint, generation), instances, settings, args.concurrency)
    results["vllm_concurrent"] = served
    print(f"vllm {args.concurrency} concurrent", served, flush=True)
    results["speedup_episodes_per_min"] = round(
        served["episodes_per_min"] / local["episodes_per_min"], 2
    )
    atomic_write_json(args.out, results)
    print(f"speedup {results['speedup_episodes_per_min']}x; wrote {args.out}")


if __name__ == "__main__":
    main()
