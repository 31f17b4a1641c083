"""Rollout throughput of the local backend: KV-cache reuse, and concurrent episodes.

1. One episode of `--steps` steps, with and without reusing the conversation's KV cache
   between turns (greedy: both runs generate the same text, so they do the same work
   apart from re-encoding the history). Reuse saves encoding time only, so the run
   without it also gives the ceiling: its wall time over its wall time less all its
   prefill (the speedup if encoding cost nothing), with the decode cost per token.
2. `--concurrency` episodes at once (e.g. 1 vs 4), each `--concurrent-steps` steps, the
   backend batching their requests into shared `generate` calls.

    python benchmarks/bench_rollout.py [--steps 20] [--concurrency 1,4] [--threads N]

Writes benchmarks/results/rollout.json. `--threads` sets torch's intra-op threads for this
process only (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from stepflow.config import GenerationConfig
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.trajectory import read_trajectories
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.llm.local import LocalBackend
from stepflow.provenance import code_version, utc_now
from stepflow.rollout.engine import rollout
from stepflow.rollout.episode import EpisodeSettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rollout.json"
TASK = "find-non-living-thing"


def run(
    backend: LocalBackend,
    variations: list[int],
    steps: int,
    concurrency: int,
    max_observation_chars: int,
) -> dict:
    """Run episodes (fresh output file) and measure them."""
    instances = [TaskInstance("scienceworld", TASK, v, "train") for v in variations]
    settings = EpisodeSettings(step_limit=steps, max_observation_chars=max_observation_chars)
    stats_before = dict(vars(backend.stats))
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "episodes.jsonl"
        started = time.perf_counter()
        summary = asyncio.run(
            rollout(
                instances,
                backend,
                output,
                env_factory=ScienceWorldEnv,
                settings=settings,
                concurrency=concurrency,
                progress=False,
            )
        )
        wall = time.perf_counter() - started
        texts = [
            [t.content for t in trajectory.assistant_turns()]
            for trajectory in read_trajectories(output)
        ]
    stats = {k: v - stats_before[k] for k, v in vars(backend.stats).items()}
    assert summary.episodes == len(instances), summary.errors
    return {
        "episodes": summary.episodes,
        "concurrency": concurrency,
        "steps": summary.steps,
        "wall_s": round(wall, 2),
        "steps_per_s": round(summary.steps / wall, 4),
        "generate_s": round(stats["generate_s"], 2),
        "prefill_s": round(stats["prefill_s"], 2),
        "decode_s": round(stats["decode_s"], 2),
        "generate_calls": stats["batches"],
        "mean_batch_size": round(stats["requests"] / max(stats["batches"], 1), 2),
        "prompt_tokens": stats["prompt_tokens"],
        "cached_prompt_tokens": stats["cached_tokens"],
        "new_prompt_tokens": stats["new_prompt_tokens"],
        "encoded_prompt_positions": stats["prefill_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "completion_tokens_per_s": round(stats["completion_tokens"] / wall, 2),
        "parse_failures": summary.parse_failures,
        "mean_reward": summary.mean_reward,
        "_texts": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of the cache episode")
    parser.add_argument("--concurrency", default="1,4", help="episode counts to compare")
    parser.add_argument("--concurrent-steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-observation-chars", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    results: dict = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        },
        "model": "embedded (SmolLM2-135M-Instruct, fp32)",
        "task": TASK,
        "max_new_tokens": args.max_new_tokens,
        "max_observation_chars": args.max_observation_chars,
    }
    warm = LocalBackend("embedded", generation=generation)
    warm.complete_sync([{"role": "user", "content": "Hello"}], max_new_tokens=4)
    cache_runs = {}
    for reuse in (True, False):
        backend = LocalBackend(
            "embedded",
            generation=generation,
            reuse_cache=reuse,
            lm=warm.model,
            tokenizer=warm.tokenizer,
        )
        name = "kv_cache_reuse" if reuse else "no_cache_reuse"
        cache_runs[name] = run(backend, [1], args.steps, 1, args.max_observation_chars)
        backend.close()
        print(name, {k: v for k, v in cache_runs[name].items() if k != "_texts"}, flush=True)
    same = cache_runs["kv_cache_reuse"].pop("_texts") == cache_runs["no_cache_reuse"].pop("_texts")
    plain = cache_runs["no_cache_reuse"]
    results["single_episode"] = {
        **cache_runs,
        "same_outputs": same,
        "speedup": round(
            cache_runs["kv_cache_reuse"]["steps_per_s"] / plain["steps_per_s"],
            2,
        ),
        # what reuse could give at most: the episode without reuse, minus all its encoding
        "ceiling_if_prefill_were_free": round(
            plain["wall_s"] / (plain["wall_s"] - plain["prefill_s"]), 2
        ),
        "decode_s_per_token": round(plain["decode_s"] / plain["completion_tokens"], 4),
        "prefill_s_per_step_without_reuse": round(plain["prefill_s"] / plain["steps"], 3),
    }
    concurrent = {}
    for count in [int(c) for c in args.concurrency.split(",")]:
        backend = LocalBackend(
            "embedded", generation=generation, lm=warm.model, tokenizer=warm.tokenizer
        )
        result = run(
            backend,
            list(range(1, count + 1)),
            args.concurrent_steps,
            count,
            args.max_observation_chars,
        )
        result.pop("_texts")
        backend.close()
        concurrent[str(count)] = result
        print(f"concurrency {count}", result, flush=True)
    counts = sorted(concurrent, key=int)
    results["concurrent_episodes"] = {
        **concurrent,
        "speedup": round(
            concurrent[counts[-1]]["steps_per_s"] / concurrent[counts[0]]["steps_per_s"], 2
        ),
    }
    warm.close()
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
