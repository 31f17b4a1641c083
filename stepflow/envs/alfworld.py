"""ALFWorld (PyPI `alfworld` + `textworld[pddl]`): the text-only TextWorld PDDL engine.

Game files come from `alfworld-download` (not on PyPI): `<data>/json_2.1.1/<split>/
<task type>-<object>-<movable>-<receptacle>-<scene>/<trial>/game.tw-pddl` next to its
`traj_data.json`. A variation is the index of a game in one task type's list: the sorted
`train` games first, then `valid_seen`, then `valid_unseen`, so every game has one key.
Games ALFWorld itself skips (movable receptacles, sliced objects, `solvable: false`) are left
out. The engine is deterministic, so restoring a state by reset + replay is exact. Its
TextWorld/TatSu parsers are shared module state and not thread-safe, so calls into the engine
from concurrent episodes take turns (each call takes milliseconds).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from functools import cache
from pathlib import Path
from typing import Literal

from stepflow.config import ALFWORLD_TASK_TYPES, AlfworldConfig
from stepflow.envs.base import StepResult, TaskInstance, TextEnv

ENV_NAME = "alfworld"
OfficialSplit = Literal["train", "valid_seen", "valid_unseen"]
OFFICIAL_SPLITS: tuple[OfficialSplit, ...] = ("train", "valid_seen", "valid_unseen")
GAME_FILE = "game.tw-pddl"
EXPERT_MAX_STEPS = 200
_NOTHING = "Nothing happens."
_OBSERVATION_ONLY = re.compile(r"^(look|inventory|help|examine .+)$")
_ENGINE = threading.RLock()  # one engine call at a time in this process
_TASK = re.compile(r"\s*Your task is to:\s*(?P<task>.+?)\s*$", re.S)


def observation_only(action: str) -> bool:
    """Whether an action only observes (it leaves the world as it was)."""
    return bool(_OBSERVATION_ONLY.match(" ".join(action.lower().split())))


def data_root(config: AlfworldConfig) -> Path:
    """The directory holding `json_2.1.1/` (params first, then ALFWORLD_DATA)."""
    root = config.data_dir or os.environ.get("ALFWORLD_DATA")
    if not root:
        raise FileNotFoundError(
            "ALFWorld game files: env.alfworld.data_dir is not set and neither is "
            "ALFWORLD_DATA; run `alfworld-download` on a networked machine and point one "
            "of them at the directory holding json_2.1.1/"
        )
    games = Path(root).expanduser() / "json_2.1.1"
    if not games.is_dir():
        raise FileNotFoundError(f"ALFWorld game files: {games} does not exist (alfworld-download)")
    return games.parent


def playable(game_file: Path) -> bool:
    """Whether ALFWorld plays this game (as its own loader decides)."""
    folder = str(game_file.parent)
    if "movable" in folder or "Sliced" in folder:
        return False
    if not (game_file.parent / "traj_data.json").is_file():
        return False
    return json.loads(game_file.read_text()).get("solvable", True) is not False


@cache
def game_files(root: Path, task_type: str) -> tuple[tuple[OfficialSplit, Path], ...]:
    """(official split, game file) of one task type, in variation order."""
    games: list[tuple[OfficialSplit, Path]] = []
    for split in OFFICIAL_SPLITS:
        folder = root / "json_2.1.1" / split
        found = sorted(folder.glob(f"{task_type}-*/*/{GAME_FILE}")) if folder.is_dir() else []
        games += [(split, path) for path in found if playable(path)]
    return tuple(games)


def split_text(intro: str) -> tuple[str, str]:
    """The engine's opening text → (task, room description)."""
    text = intro.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
    match = _TASK.search(text)
    if match is None:
        return text, text
    return match.group("task").rstrip("."), text[: match.start()].strip()


def _textworld_env(expert: str | None = None):
    """PDDL engine + ALFWorld's name demangling (+ its expert when asked)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import (
        AlfredDemangler,
        AlfredExpert,
        AlfredInfos,
    )
    from textworld.envs.pddl import PddlEnv

    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
    if expert is not None:
        infos.facts = expert == "handcoded"
        infos.policy_commands = expert == "planner"
        infos.extras.append("expert_plan")
    env = AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))
    return AlfredExpert(env, expert_type=expert) if expert is not None else env


def expert_actions(game_file: Path, expert: str) -> list[str]:
    """The expert's action sequence for a game: the PDDL planner's plan, or the handcoded
    expert played until the goal is reached (as `alfworld-generate` checks solvability)."""
    with _ENGINE:
        return _play_expert(game_file, expert)


def _play_expert(game_file: Path, expert: str) -> list[str]:
    env = _textworld_env(expert)
    env.load(str(game_file))
    state = env.reset()
    if expert == "planner":
        return list(state["policy_commands"] or [])
    saved = random.getstate()
    random.seed(0)  # the handcoded expert breaks ties with `random`
    try:
        actions: list[str] = []
        while not state["won"] and len(actions) < EXPERT_MAX_STEPS:
            action = state["extra.expert_plan"][0]
            state, _, _ = env.step(action)
            actions.append(action)
        return actions
    finally:
        random.setstate(saved)
        env.close()


class AlfWorldEnv(TextEnv):
    """ALFWorld behind the TextEnv interface; success is the goal of the PDDL problem."""

    name = ENV_NAME

    def __init__(self, config: AlfworldConfig | None = None) -> None:
        self.config = config or AlfworldConfig()
        self.root = data_root(self.config)
        with _ENGINE:
            self._env = _textworld_env()
        self._instance: TaskInstance | None = None
        self._game: Path | None = None
        self._admissible: list[str] = []

    # -- task space ----------------------------------------------------------------------
    def task_types(self) -> list[str]:
        """The six ALFWorld task types."""
        return list(ALFWORLD_TASK_TYPES)

    def variations(self, task_type: str, split: Literal["train", "dev", "test"]) -> list[int]:
        """Variations of stepflow's train/dev/test split (dev/test: see `env.alfworld`)."""
        if task_type not in ALFWORLD_TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type {task_type!r}")
        official = {
            "train": "train",
            "dev": self.config.dev_split,
            "test": self.config.test_split,
        }[split]
        games = game_files(self.root, task_type)
        return [index for index, (name, _) in enumerate(games) if name == official]

    def game_file(self, instance: TaskInstance) -> Path:
        """The game file of an instance."""
        games = game_files(self.root, instance.task_type)
        if not 0 <= instance.variation < len(games):
            raise ValueError(
                f"{instance.key}: no such game ({len(games)} {instance.task_type} games "
                f"under {self.root / 'json_2.1.1'})"
            )
        return games[instance.variation][1]

    # -- episode -------------------------------------------------------------------------
    def reset(self, instance: TaskInstance) -> tuple[str, str]:
        """Load a game; return (task, room description)."""
        if instance.env != ENV_NAME:
            raise ValueError(f"{instance.key}: not an ALFWorld instance")
        self._game = self.game_file(instance)
        with _ENGINE:
            self._env.load(str(self._game))
            state = self._env.reset()
        self._instance = instance
        self._admissible = list(state["admissible_commands"])
        return split_text(state.feedback)

    def step(self, action: str) -> StepResult:
        """Execute a command; reward 1 when the goal is reached, else 0."""
        if self._instance is None:
            raise RuntimeError("step() before reset()")
        command = " ".join(action.strip().split())
        valid = command in self._admissible
        with _ENGINE:
            state, _, _ = self._env.step(command)
        self._admissible = list(state["admissible_commands"])
        won = bool(state["won"])
        observation = state.feedback.strip()
        return StepResult(
            observation=observation,
            reward=1.0 if won else 0.0,
            score=100.0 if won else 0.0,
            done=won,
            success=won,
            valid=valid and observation != _NOTHING,
            info={"game": str(self._game)},
        )

    def valid_actions(self) -> list[str]:
        """The engine's admissible commands in the current state."""
        return list(self._admissible)

    def gold_actions(self) -> list[str]:
        """The expert's plan for the current game (`env.alfworld.expert`)."""
        if self._game is None:
            raise RuntimeError("gold_actions() before reset()")
        return expert_actions(self._game, self.config.expert)

    def close(self) -> None:
        """Release the engine."""
        if self._env is not None:
            self._env.close()
            self._env = None
