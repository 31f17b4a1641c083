"""ALFWorld (PyPI `alfworld` + `textworld[pddl]`): the text-only TextWorld PDDL engine.

Game files come from `alfworld-download` (not on PyPI): `<data>/json_2.1.1/<split>/
<task type>-<object>-<movable>-<receptacle>-<scene>/<trial>/game.tw-pddl` next to its
`traj_data.json`. Training games come from `train/`, or from `valid_train/` (the sample of
`train` that ALFWorld ships for validation) when there is no `train/`; dev and test from
`valid_seen` / `valid_unseen`. A variation is the index of a game in one task type's list:
the sorted `valid_seen` games first, then `valid_unseen`, then the training games, so every
game has one key and dev/test keys do not depend on which training folder is present.
Games ALFWorld itself skips (movable receptacles, sliced objects, no or false `solvable`)
are left out: 140 `valid_seen` and 134 `valid_unseen` games remain in the 2.1.1 release.

Commands are worded as the 2.1.1 games and published ALFWorld agents word them (`put X
in/on Y`); games built with alfworld 0.4's grammar (`move X to Y`) are translated both ways,
and the other spellings agents write for the same command (`put X in Y`, `put X on Y`,
`place X in/on Y`, any case) are mapped to it. Golden actions are the PDDL planner's plan
(`expert: planner`) or the handcoded expert's path where it reaches the goal within
`golden_max_steps` (else the planner's). The engine is deterministic, so restoring a state
by reset + replay is exact. Its TextWorld/TatSu parsers are shared module state and not
thread-safe, so calls into the engine from concurrent episodes take turns.

Over 300 lines, one module: one environment's adapter (game discovery, command wording, the
experts) behind the `TextEnv` interface, as each environment has.
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
from stepflow.evaluate.protocols import eto_alfworld_games

ENV_NAME = "alfworld"
Folder = Literal["train", "valid_train", "valid_seen", "valid_unseen"]
EVALUATION_FOLDERS: tuple[Folder, ...] = ("valid_seen", "valid_unseen")
TRAINING_FOLDERS: tuple[Folder, ...] = ("train", "valid_train")  # the first one present
GAME_FILE = "game.tw-pddl"
EXPERT_MAX_STEPS = 200
_NOTHING = "Nothing happens."
_OBSERVATION_ONLY = re.compile(r"^(look|inventory|help|examine .+)$")
_ENGINE = threading.RLock()  # one engine call at a time in this process
_TASK = re.compile(r"\s*Your task is to:\s*(?P<task>.+?)\s*$", re.S)
# placing an object: the 2.1.1 games' `put X in/on Y`, alfworld 0.4's `move X to Y`
_PLACE_VERBS = ("put", "move", "place")  # how agents write it
_PLACE_PREPOSITIONS = ("in/on", "in", "on", "into", "onto", "to", "inside")
_GAME_PLACE = re.compile(r"^(?:put (?P<o>.+?) in/on|move (?P<o2>.+?) to) (?P<r>.+)$")


def observation_only(action: str) -> bool:
    """Whether an action only observes (it leaves the world as it was)."""
    return bool(_OBSERVATION_ONLY.match(" ".join(action.lower().split())))


def _spaced(action: str) -> str:
    return " ".join(action.strip().rstrip(".").split()).lower()


def canonical_command(command: str) -> str:
    """A game command in stepflow's wording: `move X to Y` → `put X in/on Y`."""
    match = _GAME_PLACE.match(command)
    if match is None:
        return command
    return f"put {match.group('o') or match.group('o2')} in/on {match.group('r')}"


_AGENT_PLACE = re.compile(
    rf"^(?:{'|'.join(_PLACE_VERBS)}) (?P<o>.+?) (?:{'|'.join(map(re.escape, _PLACE_PREPOSITIONS))})"
    r" (?P<r>.+)$"
)


def canonical_wording(action: str) -> str:
    """A placing action in the games' wording, whichever verb and preposition the agent
    wrote (`place mug 1 on desk 1` → `put mug 1 in/on desk 1`); other actions unchanged.
    Without the game's admissible commands at hand, `put X into Y` counts as placing too."""
    match = _AGENT_PLACE.match(_spaced(action))
    if match is None:
        return action
    return f"put {match.group('o')} in/on {match.group('r')}"


def command_lookup(admissible: list[str]) -> dict[str, str]:
    """Every accepted spelling (lower case, single spaces) → the game's admissible command."""
    lookup: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for command in admissible:
        lookup[_spaced(command)] = command
        match = _GAME_PLACE.match(command)
        if match is None:
            continue
        obj, recep = match.group("o") or match.group("o2"), match.group("r")
        for verb in _PLACE_VERBS:
            for prep in _PLACE_PREPOSITIONS:
                aliases.setdefault(f"{verb} {obj} {prep} {recep}", command)
    # an exact admissible command wins over an alias (`put X into Y` is its own action)
    return {**aliases, **lookup}


def resolve_command(action: str, admissible: list[str]) -> str:
    """The game command an agent's action means: itself when admissible, else the
    admissible command it spells differently (see the module docstring), else the action
    with its spacing normalised (the engine answers "Nothing happens.")."""
    plain = " ".join(action.strip().split())
    if plain in admissible:
        return plain
    return command_lookup(admissible).get(_spaced(plain), plain)


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


def unpack_games(archive: Path, target: Path) -> Path:
    """Extract a `json_2.1.1` archive (as `alfworld-download` fetches it) into `target`;
    returns `target`, a directory to use as ALFWORLD_DATA."""
    import tarfile

    if not Path(archive).is_file():
        raise FileNotFoundError(f"ALFWorld game archive {archive} does not exist")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    if not (Path(target) / "json_2.1.1").is_dir():
        raise FileNotFoundError(f"{archive} holds no json_2.1.1/ folder")
    return Path(target)


def playable(game_file: Path) -> bool:
    """Whether ALFWorld plays this game (as its own loader decides: no movable receptacle,
    no sliced object, a `traj_data.json`, and `solvable: true` in the game file)."""
    folder = str(game_file.parent)
    if "movable" in folder or "Sliced" in folder:
        return False
    if not (game_file.parent / "traj_data.json").is_file():
        return False
    return json.loads(game_file.read_text()).get("solvable") is True


def _has_games(folder: Path) -> bool:
    return folder.is_dir() and next(folder.glob(f"*/*/{GAME_FILE}"), None) is not None


@cache
def training_folder(root: Path) -> Folder:
    """Where training games come from: `train/`, else `valid_train/`."""
    for name in TRAINING_FOLDERS:
        if _has_games(root / "json_2.1.1" / name):
            return name
    return "train"


@cache
def game_files(root: Path, task_type: str) -> tuple[tuple[Folder, Path], ...]:
    """(folder, game file) of one task type, in variation order."""
    games: list[tuple[Folder, Path]] = []
    for split in (*EVALUATION_FOLDERS, training_folder(root)):
        folder = root / "json_2.1.1" / split
        found = sorted(folder.glob(f"{task_type}-*/*/{GAME_FILE}")) if folder.is_dir() else []
        games += [(split, path) for path in found if playable(path)]
    return tuple(games)


def game_id(game_file: Path) -> str:
    """A game as `<folder>/<task folder>/<trial>` (ETO's list names `valid_unseen` games
    as `<task folder>/<trial>`)."""
    return "/".join(game_file.parent.parts[-3:])


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


def expert_actions(game_file: Path, expert: str, max_steps: int = EXPERT_MAX_STEPS) -> list[str]:
    """An expert's action sequence for a game, in stepflow's wording: the PDDL planner's
    plan, or the handcoded expert played until the goal is reached (as
    `alfworld-generate` checks solvability) or `max_steps` actions were taken."""
    with _ENGINE:
        return [canonical_command(a) for a in _play_expert(game_file, expert, max_steps)]


def _play_expert(game_file: Path, expert: str, max_steps: int) -> list[str]:
    env = _textworld_env(expert)
    try:
        env.load(str(game_file))
        state = env.reset()
        if expert == "planner":
            return list(state["policy_commands"] or [])
        saved = random.getstate()
        random.seed(0)  # the handcoded expert breaks ties with `random`
        try:
            actions: list[str] = []
            while not state["won"] and len(actions) < max_steps:
                action = state["extra.expert_plan"][0]
                state, _, _ = env.step(action)
                actions.append(action)
            return actions if state["won"] else []
        finally:
            random.setstate(saved)
    finally:
        env.close()


class AlfWorldEnv(TextEnv):
    """ALFWorld behind the TextEnv interface; success is the goal of the PDDL problem."""

    name = ENV_NAME

    def __init__(self, config: AlfworldConfig | None = None) -> None:
        self.config = config or AlfworldConfig()
        self.root = data_root(self.config)
        self.golden_max_steps = self.config.golden_max_steps
        self.gold_expert: str | None = None  # the expert the last gold_actions() followed
        with _ENGINE:
            self._env = _textworld_env()
        self._instance: TaskInstance | None = None
        self._game: Path | None = None
        self._loaded: Path | None = None
        self._admissible: list[str] = []

    # -- task space ----------------------------------------------------------------------
    def task_types(self) -> list[str]:
        """The six ALFWorld task types."""
        return list(ALFWORLD_TASK_TYPES)

    def folder(self, split: Literal["train", "dev", "test"]) -> Folder:
        """The data folder a stepflow split draws its games from."""
        if split == "train":
            return training_folder(self.root)
        return self.config.dev_split if split == "dev" else self.config.test_split

    def split_sources(self, instances: str = "official") -> dict[str, str]:
        """stepflow split → the `json_2.1.1/` folder its games come from (with ETO's lists,
        `splits.instances: eto`: all of `valid_seen`, and `valid_unseen` as ETO lists it)."""
        if instances == "eto":
            return {
                "train": self.folder("train"),
                "dev": "valid_seen",
                "test": "valid_unseen (ETO's gamefile_id.txt)",
            }
        return {split: self.folder(split) for split in ("train", "dev", "test")}

    def eto_variations(self, task_type: str, split: Literal["dev", "test"]) -> list[int]:
        """ETO's instances of a task type: every `valid_seen` game (dev, ETO's "seen"
        set) or the `valid_unseen` games ETO lists (test); a listed game this data lacks
        is an error."""
        games = game_files(self.root, task_type)
        if split == "dev":
            return [i for i, (folder, _) in enumerate(games) if folder == "valid_seen"]
        index = {game_id(path): i for i, (_, path) in enumerate(games)}
        prefix = f"valid_unseen/{task_type}-"
        listed = [game for game in eto_alfworld_games() if game.startswith(prefix)]
        missing = [game for game in listed if game not in index]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} game(s) of ETO's ALFWorld test list are not playable under "
                f"{self.root / 'json_2.1.1'}, e.g. {missing[0]} (alfworld-download)"
            )
        return sorted(index[game] for game in listed)

    def variations(self, task_type: str, split: Literal["train", "dev", "test"]) -> list[int]:
        """Variations of stepflow's train/dev/test split (see `split_sources`)."""
        if task_type not in ALFWORLD_TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type {task_type!r}")
        folder = self.folder(split)
        games = game_files(self.root, task_type)
        return [index for index, (name, _) in enumerate(games) if name == folder]

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
        """Load a game (once while the same game is replayed); return (task, room)."""
        if instance.env != ENV_NAME:
            raise ValueError(f"{instance.key}: not an ALFWorld instance")
        self._game = self.game_file(instance)
        with _ENGINE:
            if self._loaded != self._game:
                self._loaded = None
                self._env.load(str(self._game))
                self._loaded = self._game
            state = self._env.reset()
        self._instance = instance
        self._admissible = list(state["admissible_commands"])
        return split_text(state.feedback)

    def step(self, action: str) -> StepResult:
        """Execute a command (any accepted wording); reward 1 when the goal is reached."""
        if self._instance is None:
            raise RuntimeError("step() before reset()")
        command = resolve_command(action, self._admissible)
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
            info={"game": str(self._game), "command": canonical_command(command)},
        )

    def valid_actions(self) -> list[str]:
        """The engine's admissible commands in the current state, in stepflow's wording."""
        return [canonical_command(command) for command in self._admissible]

    def gold_actions(self) -> list[str]:
        """The expert's plan for the current game from its start (`env.alfworld.expert`;
        the game is reset): the planner's, or the handcoded expert's path when it reaches
        the goal within `golden_max_steps` actions (else the planner's). `gold_expert`
        names the one followed."""
        if self._game is None or self._instance is None:
            raise RuntimeError("gold_actions() before reset()")
        if self.config.expert == "handcoded":
            actions = expert_actions(self._game, "handcoded", self.golden_max_steps)
            if actions:
                self.gold_expert = "handcoded"
                self.reset(self._instance)
                return actions
        self.gold_expert = "planner"
        return self._plan()

    def _plan(self) -> list[str]:
        """The PDDL planner's plan from the game's initial state, computed on this engine
        (what ALFWorld's planner expert reads as `policy_commands`, without loading the
        game a second time)."""
        with _ENGINE:
            state = self._env.reset()
            self._admissible = list(state["admissible_commands"])
            pddl = self._env.unwrapped  # textworld's PddlEnv, names demangled by ALFWorld
            plan = pddl._pddl_state.replan(pddl._entity_infos)
        return [canonical_command(action) for action in plan]

    def close(self) -> None:
        """Release the engine."""
        if self._env is not None:
            self._env.close()
            self._env = None
