"""Evaluation metrics computed from trajectories: reward, success, rates, bootstrap CIs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from stepflow.data.trajectory import Trajectory
from stepflow.evaluate.protocols import protocol_reward


class Interval(BaseModel):
    """A point estimate with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float


class GroupMetrics(BaseModel):
    """Metrics over a group of episodes (all, or one task type).

    `truncated_turns`: turns cut by the generation limit (`max_new_tokens`), summed over the
    episodes (`truncation_rate` per step); `fitted_prompts`: prompts fitted to the context
    (earlier observations elided, stepflow.agent.context).
    """

    episodes: int
    steps: int
    reward: Interval
    success: Interval
    parse_failure_rate: float
    invalid_action_rate: float
    failed_episodes: int
    truncated_turns: int = 0
    truncation_rate: float = 0.0
    fitted_prompts: int = 0


class AgentMetrics(BaseModel):
    """Everything evaluation reports for one agent on one split."""

    agent: str
    split: str
    overall: GroupMetrics
    per_task: dict[str, GroupMetrics]
    instances: list[str]
    confidence: float
    bootstrap_samples: int
    protocol: str = "stepflow"  # how rewards and step limits were set (stepflow.evaluate.protocols)

    def flat(self) -> dict[str, float]:
        """`name: value` pairs for MLflow (`reward`, `success`, `reward/<task>`, ...)."""
        out = _flat(self.overall, "")
        for task, group in self.per_task.items():
            out.update(_flat(group, f"/{task}"))
        return out


def _flat(group: GroupMetrics, suffix: str) -> dict[str, float]:
    return {
        f"reward{suffix}": group.reward.mean,
        f"reward_ci_low{suffix}": group.reward.low,
        f"reward_ci_high{suffix}": group.reward.high,
        f"success{suffix}": group.success.mean,
        f"success_ci_low{suffix}": group.success.low,
        f"success_ci_high{suffix}": group.success.high,
        f"episodes{suffix}": float(group.episodes),
        f"parse_failure_rate{suffix}": group.parse_failure_rate,
        f"invalid_action_rate{suffix}": group.invalid_action_rate,
        f"failed_episodes{suffix}": float(group.failed_episodes),
        f"truncated_turns{suffix}": float(group.truncated_turns),
        f"truncation_rate{suffix}": group.truncation_rate,
        f"fitted_prompts{suffix}": float(group.fitted_prompts),
    }


def bootstrap_interval(
    values: Sequence[float], samples: int, confidence: float, seed: int
) -> Interval:
    """Percentile bootstrap over instances of the mean of `values`."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Interval(mean=0.0, low=0.0, high=0.0)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, data.size, size=(samples, data.size))
    means = data[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(mean=float(data.mean()), low=float(low), high=float(high))


def group_metrics(
    trajectories: Sequence[Trajectory],
    samples: int,
    confidence: float,
    seed: int,
    protocol: str = "stepflow",
) -> GroupMetrics:
    """Metrics of one group of episodes; rewards as the evaluation protocol defines them."""
    steps = sum(t.num_steps for t in trajectories)
    parse_failures = sum(t.stats.parse_failures for t in trajectories)
    invalid = sum(t.stats.invalid_actions for t in trajectories)
    rewards = [protocol_reward(t, protocol) for t in trajectories]
    truncated = sum(t.stats.truncated for t in trajectories)
    return GroupMetrics(
        episodes=len(trajectories),
        steps=steps,
        reward=bootstrap_interval(rewards, samples, confidence, seed),
        success=bootstrap_interval(
            [float(t.success) for t in trajectories], samples, confidence, seed
        ),
        parse_failure_rate=parse_failures / steps if steps else 0.0,
        invalid_action_rate=invalid / steps if steps else 0.0,
        failed_episodes=sum(1 for t in trajectories if t.failure),
        truncated_turns=truncated,
        truncation_rate=truncated / steps if steps else 0.0,
        fitted_prompts=sum(t.stats.fitted_prompts for t in trajectories),
    )


def agent_metrics(
    agent: str,
    split: str,
    trajectories: Sequence[Trajectory],
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    protocol: str = "stepflow",
) -> AgentMetrics:
    """Overall and per-task-type metrics of an agent's evaluation episodes."""
    by_task: dict[str, list[Trajectory]] = {}
    for trajectory in trajectories:
        by_task.setdefault(trajectory.task_type, []).append(trajectory)
    return AgentMetrics(
        agent=agent,
        split=split,
        overall=group_metrics(trajectories, samples, confidence, seed, protocol),
        per_task={
            task: group_metrics(group, samples, confidence, seed, protocol)
            for task, group in sorted(by_task.items())
        },
        instances=sorted(t.key for t in trajectories),
        confidence=confidence,
        bootstrap_samples=samples,
        protocol=protocol,
    )
