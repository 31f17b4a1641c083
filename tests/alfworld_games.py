"""ALFWorld data for the tests: the real 2.1.1 games from the shared archive, and a tiny
self-made dataset for the fast tests of the adapter.

The real games (`valid_train`, `valid_seen`, `valid_unseen` of ALFWorld's json_2.1.1
release) come from `<repo>/../shared/data/alfworld/json_2.1.1.tar.gz` (or
`$STEPFLOW_SHARED_DATA/alfworld/...`), extracted into a temporary directory.

Each self-made game is a one-room "pick and place" PDDL problem for the domain the `alfworld` wheel
ships (`alfworld/data/alfred.pddl`), with the object and receptacle ids mangled the way
ALFRED's scenes name them, a `traj_data.json` with the task parameters the handcoded expert
reads, and a `game.tw-pddl` built as `alfworld-generate` builds it (domain, grammar with the
task filled in, problem).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("STEPFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_GAMES = SHARED_DATA / "alfworld" / "json_2.1.1.tar.gz"

RECEPTACLES = {
    "CounterTop": ("_plus_00_dot_50_bar__plus_00_dot_95_bar__plus_01_dot_00", "loc_bar_1_bar_4"),
    "Fridge": ("_minus_01_dot_00_bar__plus_00_dot_00_bar__minus_01_dot_50", "loc_bar_2_bar_2"),
    "Cabinet": ("_plus_01_dot_50_bar__plus_02_dot_00_bar__plus_00_dot_50", "loc_bar_3_bar_1"),
    "DiningTable": ("_minus_00_dot_70_bar__plus_00_dot_75_bar__plus_02_dot_10", "loc_bar_5_bar_6"),
}
OPENABLE = {"Fridge", "Cabinet"}
OBJECTS = {"Apple": "_plus_01_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_00"}
OBJECTS["Mug"] = "_plus_02_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_00"

# (object, where it starts, where it must go) per game, by official split
GAMES = {
    "train": [
        ("Apple", "Fridge", "CounterTop"),
        ("Mug", "Cabinet", "CounterTop"),
        ("Apple", "Fridge", "DiningTable"),
        ("Mug", "Cabinet", "DiningTable"),
    ],
    "valid_seen": [("Apple", "CounterTop", "DiningTable")],
    "valid_unseen": [("Mug", "DiningTable", "CounterTop"), ("Apple", "DiningTable", "CounterTop")],
}


def _rid(name: str) -> str:
    return f"{name}_bar_{RECEPTACLES[name][0]}"


def _oid(name: str) -> str:
    return f"{name}_bar_{OBJECTS[name]}"


def _loc(name: str) -> str:
    return f"{RECEPTACLES[name][1]}_bar_1_bar_45"


def problem(obj: str, source: str, target: str) -> str:
    """A PDDL problem: `obj` lies in `source`; the goal is `obj` in a `target`."""
    objects = ["agent1 - agent", "loc_bar_0_bar_0_bar_0_bar_0 - location"]
    objects += [f"{o}Type - otype" for o in OBJECTS]
    objects += [f"{r}Type - rtype" for r in RECEPTACLES]
    objects += [f"{_oid(o)} - object" for o in OBJECTS]
    objects += [f"{_rid(r)} - receptacle" for r in RECEPTACLES]
    objects += [f"{_loc(r)} - location" for r in RECEPTACLES]
    other = next(o for o in OBJECTS if o != obj)
    other_place = "Cabinet" if source != "Cabinet" else "Fridge"
    init = ["(atLocation agent1 loc_bar_0_bar_0_bar_0_bar_0)"]
    for r in RECEPTACLES:
        init.append(f"(receptacleType {_rid(r)} {r}Type)")
        init.append(f"(receptacleAtLocation {_rid(r)} {_loc(r)})")
        init += [f"(openable {_rid(r)})"] if r in OPENABLE else []
        init += [f"(canContain {r}Type {o}Type)" for o in OBJECTS]
    for o, place in ((obj, source), (other, other_place)):
        init += [
            f"(objectType {_oid(o)} {o}Type)",
            f"(pickupable {_oid(o)})",
            f"(inReceptacle {_oid(o)} {_rid(place)})",
            f"(objectAtLocation {_oid(o)} {_loc(place)})",
        ]
    goal = (
        "(exists (?r - receptacle) (exists (?o - object) (and "
        f"(objectType ?o {obj}Type) (receptacleType ?r {target}Type) (inReceptacle ?o ?r))))"
    )
    lines = "\n".join(init)
    return (
        f"(define (problem plan_tiny_{obj}_{source}_{target})\n(:domain alfred)\n"
        f"(:objects\n{chr(10).join(objects)}\n)\n(:init\n{lines}\n)\n(:goal (and {goal}))\n)\n"
    )


def write_game(folder: Path, obj: str, source: str, target: str) -> Path:
    """Write traj_data.json, initial_state.pddl and game.tw-pddl; return the game file."""
    import random

    from alfworld.agents.utils.misc import add_task_to_grammar
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    folder.mkdir(parents=True, exist_ok=True)
    traj = {
        "task_type": "pick_and_place_simple",
        "pddl_params": {
            "object_target": obj,
            "parent_target": target,
            "toggle_target": "",
            "mrecep_target": "",
            "object_sliced": False,
        },
    }
    random.seed(f"{obj}{source}{target}")  # the task sentence template is drawn at random
    pddl = problem(obj, source, target)
    (folder / "traj_data.json").write_text(json.dumps(traj))
    (folder / "initial_state.pddl").write_text(pddl)
    game = {
        "pddl_domain": Path(ALFRED_PDDL_PATH).read_text(),
        "grammar": add_task_to_grammar(Path(ALFRED_TWL2_PATH).read_text(), traj),
        "pddl_problem": pddl,
        "solvable": True,
        "walkthrough": None,
    }
    path = folder / "game.tw-pddl"
    path.write_text(json.dumps(game))
    return path


def write_dataset(root: Path, train_folder: str = "train") -> Path:
    """The tiny dataset under `root/json_2.1.1` (training games in `train_folder`);
    returns `root` (an ALFWORLD_DATA)."""
    for split, games in GAMES.items():
        for index, (obj, source, target) in enumerate(games):
            name = f"pick_and_place_simple-{obj}-None-{target}-{index + 1}"
            folder = split if split != "train" else train_folder
            trial = root / "json_2.1.1" / folder / name / f"trial_T{index:04d}"
            write_game(trial, obj, source, target)
    return root


def real_games(target: Path) -> Path:
    """The real 2.1.1 games extracted into `target`; returns `target` (an ALFWORLD_DATA)."""
    from stepflow.envs.alfworld import unpack_games

    if not REAL_GAMES.is_file():
        raise FileNotFoundError(
            f"real ALFWorld games: {REAL_GAMES} not found; the tests expect the shared data "
            "directory beside the repository (../shared/data) or STEPFLOW_SHARED_DATA"
        )
    return unpack_games(REAL_GAMES, target)
