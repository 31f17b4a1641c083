"""The study's summary (`study.results`): per seed and agent, episodes, success, reward,
training trajectories and trained tokens; the mean over seeds with a two-level bootstrap CI
(seeds, then test instances); and the paired difference of the compared agents
(`study.compare`) on identical instances."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stepflow import method
from stepflow.config import Params
from stepflow.data.jsonl import atomic_write_json, atomic_write_text
from stepflow.data.trajectory import Trajectory, read_trajectories
from stepflow.evaluate.metrics import Interval
from stepflow.evaluate.protocols import eto_variations, protocol_reward
from stepflow.method import MODEL_CARD
from stepflow.study.seeds import TIMINGS, Timings, seed_dir


def two_level_bootstrap(matrix: np.ndarray, samples: int, confidence: float, seed: int) -> Interval:
    """Mean of a seeds x instances matrix, with a percentile bootstrap that resamples seeds
    and, within them, instances (training variance and instance variance both counted)."""
    data = np.asarray(matrix, dtype=float)
    if data.size == 0:
        return Interval(mean=0.0, low=0.0, high=0.0)
    rng = np.random.default_rng(seed)
    n_seeds, n_instances = data.shape
    seeds = rng.integers(0, n_seeds, size=(samples, n_seeds))
    instances = rng.integers(0, n_instances, size=(samples, n_instances))
    means = data[seeds[:, :, None], instances[:, None, :]].mean(axis=(1, 2))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(mean=float(data.mean()), low=float(low), high=float(high))


def instance_matrix(runs: Sequence[dict[str, float]]) -> tuple[np.ndarray, list[str]]:
    """Seeds x instances of the values of the instances every seed ran."""
    common = sorted(set.intersection(*(set(run) for run in runs))) if runs else []
    return np.array([[run[key] for key in common] for run in runs]), common


def paired_difference(
    first: Sequence[dict[str, float]],
    second: Sequence[dict[str, float]],
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> tuple[Interval, int]:
    """Mean of first - second over the instances both agents ran in every seed, with a
    two-level bootstrap CI (seeds, then instances); and the number of instances."""
    diffs = [
        {key: a[key] - b[key] for key in a.keys() & b.keys()}
        for a, b in zip(first, second, strict=True)
    ]
    matrix, common = instance_matrix(diffs)
    return two_level_bootstrap(matrix, samples, confidence, seed), len(common)


def _eto_subset(trajectories: list[Trajectory], params: Params) -> list[Trajectory]:
    """The episodes on instances of ETO's fixed test list (ScienceWorld)."""
    if params.env.name != "scienceworld":
        return []
    listed = {
        (task, variation)
        for task in params.env.task_types
        for variation in eto_variations(task, "test")
    }
    return [t for t in trajectories if (t.task_type, t.variation) in listed]


def _card(params: Params, agent: str) -> dict[str, Any]:
    trained = method.agent(agent).variant
    if trained is None:
        return {}
    path = method.variant(trained).output_dir(params.paths.models) / MODEL_CARD
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_row(params: Params, agent: str) -> dict[str, Any] | None:
    """One seed's figures of one agent (None when its test evaluation is missing)."""
    from stepflow.evaluate.evaluation import current_evaluation, eval_paths

    path, _ = eval_paths(params, agent, "test")
    if not path.is_file() or current_evaluation(params, agent) is None:
        return None  # missing, or evaluated with other settings or another adapter
    episodes = list(read_trajectories(path))
    if not episodes:
        return None
    protocol = params.evaluation.protocol
    card = _card(params, agent)
    tokens = card.get("token_stats", {})
    eto = _eto_subset(episodes, params)
    return {
        "episodes": len(episodes),
        "success": float(np.mean([t.success for t in episodes])) if episodes else 0.0,
        "reward": float(np.mean([protocol_reward(t, protocol) for t in episodes]))
        if episodes
        else 0.0,
        "trajectories": sum(d["trajectories"] for d in card.get("data", [])) or None,
        "trained_tokens": tokens.get("trained_tokens"),
        "eto_subset": {
            "episodes": len(eto),
            "success": float(np.mean([t.success for t in eto])) if eto else None,
        },
        "per_instance": {t.key: float(t.success) for t in episodes},
        "per_instance_reward": {t.key: protocol_reward(t, protocol) for t in episodes},
    }


def summarize(params: Params, seed_params: dict[int, Params]) -> dict[str, Any]:
    """The study's summary over the seeds that have results (see the module docstring)."""
    samples, confidence = params.evaluation.bootstrap_samples, params.evaluation.confidence
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for seed, run in seed_params.items():
        for agent in params.evaluation.agents:
            row = seed_row(run, agent)
            if row is not None:
                rows.setdefault(agent, {})[seed] = row
    agents: dict[str, Any] = {}
    for agent, by_seed in rows.items():
        success, _ = instance_matrix([r["per_instance"] for r in by_seed.values()])
        reward, _ = instance_matrix([r["per_instance_reward"] for r in by_seed.values()])
        per_seed = [r["success"] for r in by_seed.values()]
        agents[agent] = {
            "seeds": {
                str(seed): {
                    k: v for k, v in row.items() if k not in ("per_instance", "per_instance_reward")
                }
                for seed, row in sorted(by_seed.items())
            },
            "success": two_level_bootstrap(success, samples, confidence, params.seed).model_dump(),
            "reward": two_level_bootstrap(reward, samples, confidence, params.seed).model_dump(),
            "success_seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
        }
    first, second = params.study.compare
    paired = None
    shared = sorted(rows.get(first, {}).keys() & rows.get(second, {}).keys())
    if shared:
        interval, units = paired_difference(
            [rows[first][s]["per_instance"] for s in shared],
            [rows[second][s]["per_instance"] for s in shared],
            samples=samples,
            confidence=confidence,
            seed=params.seed,
        )
        if units:
            paired = {
                "first": first,
                "second": second,
                "metric": "success",
                "seeds": shared,
                "instances": units,
                "difference": interval.model_dump(),
                "per_seed": {
                    str(s): rows[first][s]["success"] - rows[second][s]["success"] for s in shared
                },
            }
    timings = {str(seed): Timings(seed_dir(params, seed) / TIMINGS).seconds for seed in seed_params}
    return {
        "protocol": params.evaluation.protocol,
        "task_types": list(params.env.task_types),
        "seeds": sorted(seed_params),
        "seeds_with_results": sorted({int(s) for row in agents.values() for s in row["seeds"]}),
        "confidence": confidence,
        "agents": agents,
        "paired": paired,
        "wall_seconds": {
            "per_seed": timings,
            "total": round(sum(sum(t.values()) for t in timings.values()), 1),
        },
    }


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the README's study table."""
    conf = round(summary["confidence"] * 100)
    lines = [
        f"Protocol: **{summary['protocol']}**; task types: {', '.join(summary['task_types'])}; "
        f"seeds with results: {', '.join(map(str, summary['seeds_with_results'])) or 'none'} "
        f"(of {', '.join(map(str, summary['seeds']))}).",
        "",
        f"| agent | success (mean, {conf}% CI: seeds, then instances resampled) | reward "
        "| seed std | episodes per seed | training trajectories | trained tokens "
        "| ETO-list subset |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for agent, row in summary["agents"].items():
        seeds = row["seeds"].values()
        s, r = row["success"], row["reward"]
        counts = [x["trajectories"] for x in seeds if x["trajectories"]]
        trajectories = sorted({min(counts), max(counts)}) if counts else []  # a range
        tokens = [x["trained_tokens"] for x in seeds if x["trained_tokens"]]
        eto = [x["eto_subset"] for x in seeds if x["eto_subset"]["episodes"]]
        eto_text = (
            f"{np.mean([e['success'] for e in eto]):.3f} ({eto[0]['episodes']} ep.)" if eto else "–"
        )
        lines.append(
            f"| {agent} | {s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {r['mean']:.3f} "
            f"| {row['success_seed_std']:.3f} | {'/'.join(str(x['episodes']) for x in seeds)} "
            f"| {'–'.join(map(str, trajectories)) or '–'} "
            f"| {int(np.mean(tokens)) if tokens else '–'} | {eto_text} |"
        )
    paired = summary.get("paired")
    if paired:
        d = paired["difference"]
        lines += [
            "",
            f"Paired difference {paired['first']} − {paired['second']} (success, "
            f"{paired['instances']} instances × seeds {paired['seeds']}): "
            f"**{d['mean']:+.3f}** [{d['low']:+.3f}, {d['high']:+.3f}] (CI: seeds and "
            "instances resampled); per seed: "
            + ", ".join(f"{s} {v:+.3f}" for s, v in paired["per_seed"].items())
            + ".",
        ]
    total = summary["wall_seconds"]["total"]
    lines += [
        "",
        f"Stage time summed over the seeds: {total / 3600:.2f} h (seeds run side by side, so "
        "the study's wall time is less; the time of a chunk cut off in a stage counts too).",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any]) -> bytes:
    """Success against training trajectories: one point per seed, the mean per agent."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for agent, row in summary["agents"].items():
        points = [
            (x["trajectories"], x["success"]) for x in row["seeds"].values() if x["trajectories"]
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        dots = ax.scatter(xs, ys, alpha=0.5, label=agent)
        ax.scatter(
            [np.mean(xs)],
            [row["success"]["mean"]],
            marker="D",
            s=60,
            color=dots.get_facecolor()[0],
            edgecolors="black",
        )
    ax.set_xlabel("training trajectories")
    ax.set_ylabel(f"test success ({summary['protocol']} protocol)")
    ax.set_ylim(-0.02, 1.02)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_summary(params: Params, seed_params: dict[int, Params]) -> dict[str, Any]:
    """Write `study.results` (JSON), and beside it the table (.md) and the plot (.png)."""
    summary = summarize(params, seed_params)
    results = Path(params.study.results)
    atomic_write_json(results, summary)
    atomic_write_text(results.with_suffix(".md"), markdown(summary))
    png = results.with_suffix(".png")
    tmp = png.with_suffix(".png.tmp")
    tmp.write_bytes(plot(summary))
    tmp.replace(png)
    return summary
