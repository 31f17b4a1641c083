"""Evaluation protocols: how an episode is scored and how long it may run.

- `stepflow` (default): reward = the final score / 100 (a failed task counts 0), step
  limits from `env.step_limit` / `env.step_limits`.
- `eto`: the protocol of ETO (Song et al., 2024), so numbers can be set beside published
  tables: ScienceWorld reward = the highest score reached during the episode / 100, ETO's
  step cap per task type (`eto/sciworld/max_steps.json`), ALFWorld 40 steps, WebShop 10
  steps (their reward is the final one, as in ETO).

Success is the same under both: the task solved (ScienceWorld score 100).
ETO's fixed instance lists are chosen separately, by `splits.instances: eto`: ScienceWorld
194 seen = `dev`, 211 unseen = `test` (see `eto_variations`); ALFWorld the 140 `valid_seen`
games = `dev` and the 134 `valid_unseen` games of `eto/alfworld/gamefile_id.txt` = `test`
(see `eto_alfworld_games`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from stepflow.config import Params
    from stepflow.data.trajectory import Trajectory

Protocol = Literal["stepflow", "eto"]
PROTOCOLS: tuple[Protocol, ...] = ("stepflow", "eto")
ETO_STEP_CAPS = {"alfworld": 40, "webshop": 10}  # one cap for every task type
ETO_SIMPLIFICATION = "easy"

DESCRIPTIONS = {
    "stepflow": "reward = final score / 100 (a failed task counts 0); step limits of "
    "`env.step_limit(s)`; success = task solved",
    "eto": "ETO's protocol: reward = highest score reached during the episode / 100; "
    "ETO's step cap per task type; success = task solved",
}


@dataclass(frozen=True)
class EtoScienceWorld:
    """ETO's ScienceWorld lists, in the installed simulator's task names."""

    caps: dict[str, int]  # task type -> step cap
    dev: tuple[tuple[str, int], ...]  # ETO's "seen" instances (task type, variation)
    test: tuple[tuple[str, int], ...]  # ETO's "unseen" instances

    @property
    def task_types(self) -> list[str]:
        """The task types ETO evaluates (those with a step cap)."""
        return sorted(self.caps)


def _read(name: str) -> object:
    path = resources.files(__package__) / "eto" / "sciworld" / name
    return json.loads(path.read_text())


@cache
def eto_scienceworld() -> EtoScienceWorld:
    """ETO's ScienceWorld caps and instance lists (package data), task names mapped."""
    names: dict[str, str] = _read("scienceworld_names.json")  # type: ignore[assignment]

    def name(eto_name: str, source: str) -> str:
        if eto_name not in names:
            raise ValueError(f"{source}: ETO task {eto_name!r} has no ScienceWorld name")
        return names[eto_name]

    caps = {
        name(task, "max_steps.json"): int(cap)
        for task, cap in _read("max_steps.json").items()  # type: ignore[union-attr]
    }

    def instances(file: str) -> tuple[tuple[str, int], ...]:
        return tuple((name(task, file), int(v)) for task, v in _read(file))  # type: ignore[union-attr]

    return EtoScienceWorld(
        caps=caps, dev=instances("dev_indices.json"), test=instances("test_indices.json")
    )


@cache
def eto_alfworld_games() -> tuple[str, ...]:
    """ETO's ALFWorld test games (`valid_unseen/<task folder>/<trial>`), package data."""
    path = resources.files(__package__) / "eto" / "alfworld" / "gamefile_id.txt"
    lines = (line.strip() for line in path.read_text().splitlines())
    return tuple(f"valid_unseen/{line}" for line in lines if line)


def eto_variations(task_type: str, split: Literal["dev", "test"]) -> list[int]:
    """The variations of a ScienceWorld task type in ETO's seen (`dev`) or unseen (`test`)
    list, sorted."""
    listed = getattr(eto_scienceworld(), split)
    return sorted(v for task, v in listed if task == task_type)


def eto_step_cap(env: str, task_type: str) -> int:
    """ETO's step cap of a task type."""
    if env in ETO_STEP_CAPS:
        return ETO_STEP_CAPS[env]
    caps = eto_scienceworld().caps
    if env != "scienceworld" or task_type not in caps:
        raise ValueError(f"ETO's protocol has no step cap for {env} task type {task_type!r}")
    return caps[task_type]


def eto_problems(env: str, task_types: list[str]) -> list[str]:
    """The task types ETO has no ScienceWorld list for (empty for other environments)."""
    if env != "scienceworld":
        return []
    known = eto_scienceworld().caps
    return [task for task in task_types if task not in known]


def evaluation_step_limit(params: Params) -> Callable[[str], int]:
    """The step limit per task type that evaluation episodes run under."""
    if params.evaluation.protocol == "eto":
        env = params.env.name
        return lambda task_type: eto_step_cap(env, task_type)
    return params.env.step_limit_for


def protocol_reward(trajectory: Trajectory, protocol: str) -> float:
    """An episode's reward under a protocol, in [0, 1]."""
    if protocol == "stepflow" or trajectory.env != "scienceworld":
        return trajectory.reward
    if protocol != "eto":
        raise ValueError(f"unknown evaluation protocol {protocol!r}")
    if trajectory.max_score is None:  # no action was executed
        return 0.0
    return max(0.0, min(trajectory.max_score, 100.0)) / 100.0
