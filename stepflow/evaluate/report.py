"""The `report` stage: every agent side by side, as Markdown, CSV (DVC plots) and PNG."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from stepflow.config import Params
from stepflow.data.jsonl import atomic_write_bytes, atomic_write_text
from stepflow.evaluate.evaluation import load_agent_metrics
from stepflow.evaluate.metrics import AgentMetrics, Interval
from stepflow.evaluate.protocols import DESCRIPTIONS as PROTOCOL_DESCRIPTIONS
from stepflow.locking import holds_outputs
from stepflow.method import AGENTS, MODEL_CARD, PER_TASK, RESULTS, SYNTHESIS_STATS, VARIANTS

AGENT_LABELS = {name: agent.label for name, agent in AGENTS.items()}


@dataclass
class Report:
    """The files a report wrote, its Markdown text and its results table (one row per split and
    agent: the overall figures)."""

    markdown: str
    files: list[Path] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)


def _ci(interval: Interval) -> str:
    return f"{interval.mean:.3f} [{interval.low:.2f}, {interval.high:.2f}]"


def training_size(params: Params, agent: str) -> int | None:
    """How many trajectories an agent's adapter was trained on (from its model card; None for
    the untrained model)."""
    trained = AGENTS[agent].variant
    if trained is None:
        return None
    card = VARIANTS[trained].output_dir(params.paths.models) / MODEL_CARD
    if not card.is_file():
        return None
    data = json.loads(card.read_text())
    return sum(int(entry["trajectories"]) for entry in data.get("data", []))


def markdown_table(results: dict[str, AgentMetrics], split: str, params: Params) -> str:
    """The comparison table of one split."""
    conf = round(next(iter(results.values())).confidence * 100) if results else 95
    protocols = sorted({m.protocol for m in results.values()}) or [params.evaluation.protocol]
    protocol = ", ".join(f"`{p}`" for p in protocols)
    lines = [
        f"### {split} split — protocol {protocol}",
        "",
        *(f"Protocol `{p}`: {PROTOCOL_DESCRIPTIONS.get(p, p)}." for p in protocols),
        "",
        f"| agent | avg reward [{conf}% CI] | success rate [{conf}% CI] | episodes | "
        "train trajectories | parse failures / step | truncated turns | "
        "invalid actions / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for agent, metrics in results.items():
        o = metrics.overall
        size = training_size(params, agent)
        episodes = f"{o.episodes} ({o.failed_episodes} failed)" if o.failed_episodes else o.episodes
        lines.append(
            f"| {AGENT_LABELS.get(agent, agent)} | {_ci(o.reward)} | {_ci(o.success)} | "
            f"{episodes} | {'—' if size is None else size} | {o.parse_failure_rate:.3f} | "
            f"{o.truncated_turns} | {o.invalid_action_rate:.3f} |"
        )
    tasks = sorted({task for m in results.values() for task in m.per_task})
    lines += [
        "",
        f"Success rate per task type (protocol {protocol}):",
        "",
        "| agent | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for agent, metrics in results.items():
        cells = [
            f"{metrics.per_task[t].success.mean:.2f} (n={metrics.per_task[t].episodes})"
            if t in metrics.per_task
            else "—"
            for t in tasks
        ]
        lines.append(f"| {agent} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_rows(results: dict[str, AgentMetrics], split: str, params: Params) -> list[dict]:
    """One row per agent: the overall figures of `split` with their intervals."""
    rows = []
    for agent, metrics in results.items():
        o = metrics.overall
        rows.append(
            {
                "split": split,
                "agent": agent,
                "label": AGENT_LABELS.get(agent, agent),
                "success": round(o.success.mean, 4),
                "success_ci_low": round(o.success.low, 4),
                "success_ci_high": round(o.success.high, 4),
                "reward": round(o.reward.mean, 4),
                "reward_ci_low": round(o.reward.low, 4),
                "reward_ci_high": round(o.reward.high, 4),
                "episodes": o.episodes,
                "failed_episodes": o.failed_episodes,
                "train_trajectories": training_size(params, agent),
                "parse_failure_rate": round(o.parse_failure_rate, 4),
                "invalid_action_rate": round(o.invalid_action_rate, 4),
            }
        )
    return rows


def per_task_rows(results: dict[str, AgentMetrics], split: str) -> list[dict]:
    """Rows (split, agent, task, reward, success, episodes) incl. an 'overall' task."""
    rows = []
    for agent, metrics in results.items():
        groups = {"overall": metrics.overall, **metrics.per_task}
        for task, group in groups.items():
            rows.append(
                {
                    "split": split,
                    "agent": agent,
                    "task": task,
                    "reward": round(group.reward.mean, 4),
                    "success": round(group.success.mean, 4),
                    "episodes": group.episodes,
                }
            )
    return rows


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def plot_success_by_task(results: dict[str, AgentMetrics], split: str) -> bytes:
    """Grouped bars: success rate per task type (and overall) for every agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [*sorted({t for m in results.values() for t in m.per_task}), "overall"]
    agents = list(results)
    width = 0.8 / max(len(agents), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    x = np.arange(len(tasks))
    for i, agent in enumerate(agents):
        metrics = results[agent]
        groups = [metrics.per_task.get(t) if t != "overall" else metrics.overall for t in tasks]
        means = [g.success.mean if g else 0.0 for g in groups]
        errors = np.array(
            [
                [g.success.mean - g.success.low, g.success.high - g.success.mean] if g else [0, 0]
                for g in groups
            ]
        ).T
        ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=errors, capsize=2, label=agent)
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(f"Success rate per task type ({split})")
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_reward_vs_data(results: dict[str, AgentMetrics], params: Params, split: str) -> bytes:
    """Average reward against the number of training trajectories of each agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for agent, metrics in results.items():
        size = 0 if AGENTS[agent].variant is None else training_size(params, agent)
        if size is None:
            continue
        o = metrics.overall.reward
        ax.errorbar(
            [size],
            [o.mean],
            yerr=[[o.mean - o.low], [o.high - o.mean]],
            fmt="o",
            capsize=3,
            label=agent,
        )
        ax.annotate(agent, (size, o.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("training trajectories")
    ax.set_ylabel("average reward")
    ax.set_title(f"Reward vs training data ({split})")
    data = _png(fig)
    plt.close(fig)
    return data


def _synthesis_turns(stats: dict) -> list[str]:
    """What the kept trajectories hold and why the others were dropped."""
    if "accepted_turns" not in stats:
        return []
    dropped = ", ".join(f"{k} {v}" for k, v in stats.get("dropped_by", {}).items()) or "none"
    share = stats.get("reflection_token_share")
    own = stats.get("own_fraction", {}).get("median")
    return [
        f"Kept turns: {stats['accepted_turns']} accepted student steps "
        f"({stats['accepted_share']:.0%} of the assistant turns), {stats['erroneous_turns']} "
        f"erroneous steps, {stats['reflection_turns']} reflections, {stats['teacher_steps']} "
        "teacher steps after a rewound loss"
        + (f"; {share:.0%} of the trained tokens are reflections" if share is not None else "")
        + (f"; median own-step share {own:.2f}" if own is not None else "")
        + f". Dropped: {dropped}.",
        "",
    ]


@holds_outputs("report")
def build_report(params: Params) -> Report:
    """Write `reports/results.md`, `reports/per_task.csv` and the PNG plots."""
    out = Path(params.paths.reports)
    sections = ["# stepflow results", ""]
    rows: list[dict] = []
    table: list[dict] = []
    files: list[Path] = []
    for split in params.evaluation.splits:
        results = {
            agent: metrics
            for agent in params.evaluation.agents
            if (metrics := load_agent_metrics(params, agent, split)) is not None
        }
        missing = [a for a in params.evaluation.agents if a not in results]
        if missing:
            raise FileNotFoundError(
                f"no evaluation of {', '.join(missing)} on split {split!r} "
                f"(run the evaluate stage first)"
            )
        sections += [markdown_table(results, split, params), ""]
        rows += per_task_rows(results, split)
        table += summary_rows(results, split, params)
        for name, data in (
            (f"success_by_task_{split}.png", plot_success_by_task(results, split)),
            (f"reward_vs_data_{split}.png", plot_reward_vs_data(results, params, split)),
        ):
            atomic_write_bytes(out / name, data)
            files.append(out / name)
    synthesis = Path(params.paths.data) / SYNTHESIS_STATS
    if synthesis.is_file():
        stats = json.loads(synthesis.read_text())
        sections += [
            "### Synthesis (U2)",
            "",
            f"Teacher `{stats['teacher']}`: kept {stats['kept']}/{stats['episodes']} "
            f"trajectories, {stats['corrections_mean']:.2f} corrections per episode, "
            f"{stats['teacher_calls']} teacher calls, {stats['teacher_fallbacks']} fallbacks"
            + (
                f", {stats['failed']} episodes failed (LLM unavailable)."
                if stats.get("failed")
                else "."
            ),
            "",
            *_synthesis_turns(stats),
        ]
    sections.append(
        f"Confidence intervals: percentile bootstrap over instances "
        f"({params.evaluation.bootstrap_samples} resamples). Greedy decoding, per-task step "
        f"limits, the same instances for every agent."
    )
    markdown = "\n".join(sections) + "\n"
    atomic_write_text(out / RESULTS, markdown)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["split", "agent", "task", "reward", "success", "episodes"]
    )
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / PER_TASK, buffer.getvalue())
    files = [out / RESULTS, out / PER_TASK, *files]
    return Report(markdown=markdown, files=files, table=table)
