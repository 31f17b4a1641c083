"""Where a rollout step's time goes, and how near rollouts come to the backend's decode limit.

A study seed's `init_sft` agent (`stepflow study run` trains it) runs the same U1 training
episodes, greedy, on each backend at each concurrency (default: 1, and the study's
`rollout.concurrency`, which keeps the machine busy). Per step it reports the seconds spent
- building the prompt (`prompt`),
- waiting for the student (`llm`), divided on the backend's side into prefill (encoding up to
  the first generated token) and decode: the local backend's own clock, vLLM's `/metrics`;
- in the simulator (`env`: reset, steps),
- and the rest of the wall time (`other`: Python, I/O, episodes waiting for each other).
At concurrency 1 the parts add up to the step's wall time; above it they overlap, so the
report gives the backend's busy share of the wall time as well.

Then the backend's batched decode limit at that concurrency: `c` copies of an episode's
first prompt decoding 64 tokens each with end-of-turn ignored, tokens/s of the decode phase
(local: timed from the first generated token; vLLM: the prompt's prefix cached by a warm-up
request, so the wall time is nearly all decode). The limit ratio is the achieved steps/s ÷
(decode limit ÷ completion tokens per step): 1.0 would mean rollouts run as fast as the
backend can decode their tokens.

    python benchmarks/bench_profile.py [-p params.study.yaml] [--seed 0] [--episodes 8] \
        [--concurrency 1,8] [--backends local,vllm]

Writes benchmarks/results/profile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from stepflow.agent.context import prompt_fitter
from stepflow.agent.prompts import opening_turns
from stepflow.config import LLMConfig, Params, load_params
from stepflow.data.jsonl import atomic_write_json
from stepflow.data.splits import load_manifest
from stepflow.data.trajectory import read_trajectories
from stepflow.envs import make_env
from stepflow.llm import make_backend
from stepflow.llm.local import FirstTokenClock, LocalBackend
from stepflow.llm.serving import start_server, stop_server
from stepflow.provenance import code_version, utc_now
from stepflow.rollout.engine import rollout
from stepflow.rollout.episode import EpisodeSettings
from stepflow.study.seeds import seed_overrides

try:
    from benchmarks.bench_agent_backends import student_for
    from benchmarks.bench_matmul import machine, machine_load
except ImportError:  # run as a script
    from bench_agent_backends import student_for
    from bench_matmul import machine, machine_load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "profile.json"
LIMIT_TOKENS = 64
_METRIC = re.compile(r"^(vllm:request_(?:prefill|decode)_time_seconds)_sum(?:\{[^}]*\})? (\S+)$")


def vllm_times(base_url: str) -> dict[str, float]:
    """The server's cumulative prefill and decode seconds (its Prometheus `/metrics`)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    totals = {"prefill": 0.0, "decode": 0.0}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match:
            part = "prefill" if "prefill" in match.group(1) else "decode"
            totals[part] += float(match.group(2))
    return totals


def first_prompt(params: Params, instance) -> list[dict]:
    """The messages of an episode's first request (system prompt, task, first observation)."""
    with make_env(params.env) as env:
        instruction, observation = env.reset(instance)
    turns = opening_turns(
        instance.env, instruction, observation, None, params.agent.max_observation_chars
    )
    return [{"role": t.role, "content": t.content} for t in turns]


def local_decode_limit(backend: LocalBackend, messages: list[dict], concurrency: int) -> float:
    """Tokens/s of `concurrency` rows decoding LIMIT_TOKENS tokens after the first."""
    ids = torch.tensor([backend.encode(messages)] * concurrency)
    clock = FirstTokenClock()
    with torch.inference_mode():
        backend.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=LIMIT_TOKENS + 1,
            min_new_tokens=LIMIT_TOKENS + 1,
            do_sample=False,
            pad_token_id=backend.pad_token_id,
            stopping_criteria=[clock],
        )
    assert clock.first is not None
    return concurrency * LIMIT_TOKENS / (time.perf_counter() - clock.first)


async def vllm_decode_limit(llm: LLMConfig, messages: list[dict], concurrency: int) -> float:
    """Tokens/s of `concurrency` requests decoding LIMIT_TOKENS tokens, prefix cached."""
    assert llm.endpoint is not None
    body = {
        "model": llm.endpoint.model,
        "messages": messages,
        "max_tokens": LIMIT_TOKENS,
        "min_tokens": LIMIT_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    url = llm.endpoint.base_url.rstrip("/") + "/chat/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        (await client.post(url, json=body)).raise_for_status()  # caches the prompt's prefix
        started = time.perf_counter()
        answers = await asyncio.gather(*(client.post(url, json=body) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    tokens = sum(a.raise_for_status().json()["usage"]["completion_tokens"] for a in answers)
    return tokens / elapsed


def profile_run(
    params: Params, instances: list, llm: LLMConfig, adapter: Path | None, concurrency: int
) -> dict:
    """One rollout of `instances`; its time per step by part, and the decode limit."""
    settings = EpisodeSettings.from_params(params, source="evaluation")

    async def main() -> dict:
        backend = make_backend(llm, adapter=adapter)
        try:
            fitter = prompt_fitter(params, llm, getattr(backend, "tokenizer", None))
            base_url = llm.endpoint.base_url if llm.endpoint is not None else None
            before = vllm_times(base_url) if base_url else None
            with tempfile.TemporaryDirectory() as tmp:
                output = Path(tmp) / "episodes.jsonl"
                started = time.perf_counter()
                summary = await rollout(
                    instances,
                    backend,
                    output,
                    env_factory=functools.partial(make_env, params.env),
                    settings=dataclasses.replace(settings, prompt_fit=fitter),
                    concurrency=concurrency,
                    progress=False,
                )
                wall = time.perf_counter() - started
                trajectories = list(read_trajectories(output))
            messages = first_prompt(params, instances[0])
            if isinstance(backend, LocalBackend):
                stats = backend.stats
                server = {"prefill": stats.prefill_s, "decode": stats.decode_s}
                busy = stats.generate_s
                limit = await asyncio.to_thread(local_decode_limit, backend, messages, concurrency)
            else:
                after = vllm_times(base_url)
                server = {part: after[part] - before[part] for part in after}
                busy = None  # the server's batches overlap; its busy time is not exposed
                limit = await vllm_decode_limit(llm, messages, concurrency)
        finally:
            await backend.aclose()
        steps = summary.steps
        per_step = {
            "prompt": summary.prompt_s / steps,
            "llm": summary.llm_s / steps,
            "llm_prefill": server["prefill"] / steps,
            "llm_decode": server["decode"] / steps,
            "env": summary.env_s / steps,
        }
        per_step["other"] = wall * concurrency / steps - (
            per_step["prompt"] + per_step["llm"] + per_step["env"]
        )
        tokens_per_step = summary.completion_tokens / steps
        steps_per_s = steps / wall
        return {
            "concurrency": concurrency,
            "episodes": summary.episodes,
            "steps": steps,
            "wall_s": round(wall, 1),
            "steps_per_s": round(steps_per_s, 3),
            "success": round(sum(t.success for t in trajectories) / len(trajectories), 3),
            "seconds_per_step": {k: round(v, 3) for k, v in per_step.items()},
            "backend_busy_share": round(busy / wall, 3) if busy is not None else None,
            "completion_tokens_per_step": round(tokens_per_step, 1),
            "prompt_tokens_per_step": round(summary.prompt_tokens / steps, 1),
            "decode_limit_tokens_per_s": round(limit, 1),
            "limit_ratio": round(steps_per_s / (limit / tokens_per_step), 3),
        }

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--params", type=Path, default=Path("params.study.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--concurrency", default=None, help="e.g. 1,8 (default: 1 and the study's)")
    parser.add_argument("--backends", default="local")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    study = load_params(args.params)
    params = load_params(args.params, seed_overrides(study, args.seed))
    adapter = Path(params.paths.models) / "init_sft"
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{adapter}: no init_sft adapter; run `stepflow study run -p {args.params}` first")
    levels = args.concurrency or f"1,{params.rollout.concurrency}"
    concurrencies = sorted({int(c) for c in levels.split(",")})
    manifest = load_manifest(Path(params.paths.data) / "manifest.json")
    # U1 training instances the agent was trained on: the benchmark measures speed and never
    # touches the test split
    instances = sorted(manifest.select("u1"))[::5][: args.episodes]
    results: dict = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": machine_load(),
        "params": str(args.params),
        "seed": args.seed,
        "agent": "init_sft",
        "instances": [i.key for i in instances],
        "runs": {},
    }
    for backend in args.backends.split(","):
        server = start_server(params.serving, print) if backend == "vllm" else None
        try:
            base_url = server.base_url if server is not None else None
            llm, local_adapter = student_for(backend, params, adapter, base_url)
            for concurrency in concurrencies:
                row = profile_run(params, instances, llm, local_adapter, concurrency)
                results["runs"][f"{backend}/c{concurrency}"] = row
                print(backend, row, flush=True)
        finally:
            if server is not None:
                stop_server(params.serving)
    results["load_average_after"] = machine_load()
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
