"""ETO's evaluation protocol: its instance lists and step caps (package data checked against
the published files in `../shared/data/eto/`), the highest-score reward on a real
ScienceWorld episode whose score drops, and evaluation episodes capped by ETO's limits."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stepflow.config import ConfigError, load_params
from stepflow.data.splits import build_manifest
from stepflow.data.trajectory import Trajectory
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.evaluate.metrics import agent_metrics
from stepflow.evaluate.protocols import (
    eto_scienceworld,
    eto_step_cap,
    eto_variations,
    evaluation_step_limit,
    protocol_reward,
)
from stepflow.evaluate.report import markdown_table
from stepflow.llm.base import Completion
from stepflow.rollout.episode import EpisodeSettings, run_episode

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("STEPFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
ETO = SHARED / "eto" / "sciworld"
PACKAGED = REPO / "stepflow" / "evaluate" / "protocols" / "eto" / "sciworld"
needs_shared = pytest.mark.skipif(
    not ETO.is_dir(), reason=f"ETO's published lists not found in {ETO} (STEPFLOW_SHARED_DATA)"
)


def _shared(name: str):
    return json.loads((ETO / name).read_text())


def _names() -> dict[str, str]:
    return json.loads((PACKAGED / "scienceworld_names.json").read_text())


@needs_shared
def test_packaged_lists_are_etos_published_files() -> None:
    for name in ("dev_indices.json", "test_indices.json", "max_steps.json"):
        assert json.loads((PACKAGED / name).read_text()) == _shared(name), name
    from scienceworld.constants import ID2TASK  # the simulator's task names, no JVM

    names = _names()
    assert set(names) == set(_shared("taskname2id.json"))
    assert set(names.values()) <= set(ID2TASK.values())
    assert len(set(names.values())) == len(names)  # one ScienceWorld task per ETO name


@needs_shared
def test_eto_instances_and_caps_over_all_24_task_types() -> None:
    names = _names()
    eto = eto_scienceworld()
    assert len(eto.task_types) == 24
    for split, total in (("dev", 194), ("test", 211)):
        published = Counter((names[t], v) for t, v in _shared(f"{split}_indices.json"))
        assert sum(published.values()) == total and max(published.values()) == 1
        listed = {(t, v) for t in eto.task_types for v in eto_variations(t, split)}
        assert listed == set(published), split
    for task, cap in _shared("max_steps.json").items():
        assert eto_step_cap("scienceworld", names[task]) == cap
    assert eto_step_cap("scienceworld", "find-non-living-thing") == 15
    assert eto_step_cap("scienceworld", "boil") == 100
    assert eto_step_cap("alfworld", "pick_and_place_simple") == 40
    assert eto_step_cap("webshop", "shop") == 10
    with pytest.raises(ValueError, match="inclined-plane-determine-angle"):
        eto_step_cap("scienceworld", "inclined-plane-determine-angle")


def test_protocol_settings_are_validated(params_file) -> None:
    eto = load_params(params_file, ["evaluation.protocol=eto", "env.step_limit=3"])
    limit = evaluation_step_limit(eto)
    assert limit("find-non-living-thing") == 15 and limit("lifespan-longest-lived") == 10
    default = load_params(params_file, ["env.step_limit=3"])
    assert default.evaluation.protocol == "stepflow" and default.splits.instances == "official"
    assert evaluation_step_limit(default)("find-non-living-thing") == 3
    # what rollout jobs run episodes under: ETO's caps for evaluation only
    find = TaskInstance("scienceworld", "find-non-living-thing", 3, "test")
    assert EpisodeSettings.from_params(eto, source="evaluation").limit_for(find) == 15
    assert EpisodeSettings.from_params(eto, source="synthesis").limit_for(find) == 3
    assert EpisodeSettings.from_params(default, source="evaluation").limit_for(find) == 3
    bad = [
        ("evaluation.protocol=eto", "env.task_types=[inclined-plane-determine-angle]"),
        ("evaluation.protocol=eto", "env.simplification=noElectricalAction"),
        ("splits.instances=eto", "env.task_types=[mendelian-genetics-known-plant]"),
        ("golden.compress=true", "env.simplification=noElectricalAction"),
    ]
    for overrides in bad:
        with pytest.raises(ConfigError, match=overrides[0].split("=")[0]):
            load_params(params_file, list(overrides))


def test_manifest_draws_dev_and_test_from_eto_lists(params_file) -> None:
    tasks = ["find-plant", "lifespan-shortest-lived"]
    everything = [
        f"env.task_types={tasks}",
        "splits.instances=eto",
        "splits.dev_per_task=null",
        "splits.test_per_task=null",
        "splits.train_per_task=4",
    ]
    with ScienceWorldEnv() as env:
        manifest = build_manifest(env, load_params(params_file, everything))
        sampled = build_manifest(
            env, load_params(params_file, [*everything[:2], "splits.test_per_task=3"])
        )
        official_train = {task: set(env.variations(task, "train")) for task in tasks}
    for task in tasks:
        for split in ("dev", "test"):
            picked = [i.variation for i in manifest.select(split, task_types=[task])]
            assert sorted(picked) == eto_variations(task, split) and len(picked) == 10
        training = {i.variation for i in manifest.select("u1", "u2", task_types=[task])}
        assert len(training) == 4 and training <= official_train[task]
        drawn = {i.variation for i in sampled.select("test", task_types=[task])}
        assert len(drawn) == 3 and drawn <= set(eto_variations(task, "test"))
        assert not sampled.select("dev", task_types=[task])  # dev_per_task: 0 (default)


@dataclass
class Scripted:
    """A policy that says the given actions in order (a plain ChatBackend)."""

    actions: list[str]
    name: str = "scripted"
    said: list[str] = field(default_factory=list)

    async def complete(self, messages, *, session=None, max_new_tokens=None) -> Completion:
        action = self.actions[len(self.said)]
        self.said.append(action)
        return Completion(f"Thought: I try this.\nAction: {action}", 10, 5)

    def end_session(self, session: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_eto_reward_is_the_highest_score_of_an_episode_whose_score_drops(params_file) -> None:
    # find-living-thing variation 0 starts at score 8; reaching the outside raises it to 17;
    # focusing on an axe (not alive) fails the task: score -100, the episode ends
    instance = TaskInstance("scienceworld", "find-living-thing", 0, "test")
    policy = Scripted(["teleport to outside", "focus on axe", "look around"])
    settings = EpisodeSettings(step_limit=15, source="evaluation", params_hash="h")
    with ScienceWorldEnv() as simulator:
        trajectory = asyncio.run(run_episode(AsyncEnv(simulator), instance, policy, settings))
    assert trajectory.num_steps == 2 and trajectory.done and not trajectory.success
    assert trajectory.score == -100 and trajectory.max_score == 17
    assert Trajectory.model_validate_json(trajectory.model_dump_json()) == trajectory
    assert trajectory.reward == 0.0 == protocol_reward(trajectory, "stepflow")
    assert protocol_reward(trajectory, "eto") == pytest.approx(0.17)

    eto = agent_metrics("base", "test", [trajectory], samples=10, protocol="eto")
    default = agent_metrics("base", "test", [trajectory], samples=10)
    assert eto.overall.reward.mean == pytest.approx(0.17) and eto.protocol == "eto"
    assert default.overall.reward.mean == 0.0 and default.protocol == "stepflow"
    assert eto.overall.success.mean == default.overall.success.mean == 0.0
    params = load_params(params_file)
    assert "### test split — protocol `eto`" in markdown_table({"base": eto}, "test", params)
    assert "highest score reached" in markdown_table({"base": eto}, "test", params)
    assert "protocol `stepflow`" in markdown_table({"base": default}, "test", params)
