"""ALFWorld on the real 2.1.1 games: golden success and path lengths per task type, planner
time and engine speed, over every `valid_seen` and `valid_unseen` game ALFWorld plays.

    python benchmarks/bench_alfworld.py [--data DIR] [--handcoded N]

`--data` is a directory holding `json_2.1.1/` (default: the shared archive
`../shared/data/alfworld/json_2.1.1.tar.gz`, extracted into a temporary directory). Each
game's golden path is made as `prepare` makes it (`expert: planner`), replayed in the real
engine and counted a success only if it reaches the goal within ETO's 40 steps. With
`--handcoded N`, ALFWorld's handcoded expert is also played on the first N `valid_unseen`
games of each task type (its path lengths, for comparison). Writes
benchmarks/results/alfworld.json (after every game, so a stopped run keeps what it did).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from stepflow.config import ALFWORLD_TASK_TYPES, AlfworldConfig
from stepflow.envs.alfworld import AlfWorldEnv, expert_actions, game_files, game_id, unpack_games
from stepflow.envs.base import TaskInstance
from stepflow.jsonl import atomic_write_json
from stepflow.protocols import ETO_STEP_CAPS, eto_alfworld_games
from stepflow.provenance import code_version, utc_now

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = (
    Path(os.environ.get("STEPFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
    / "alfworld"
    / "json_2.1.1.tar.gz"
)
RESULTS = ROOT / "benchmarks" / "results" / "alfworld.json"
CAP = ETO_STEP_CAPS["alfworld"]
FOLDERS = ("valid_seen", "valid_unseen")


def _summary(rows: list[dict]) -> dict:
    """Golden success and path lengths of some games."""
    paths = [r["steps"] for r in rows if r["success"]]
    return {
        "games": len(rows),
        "success": sum(r["success"] for r in rows),
        "success_rate": round(sum(r["success"] for r in rows) / len(rows), 4) if rows else None,
        "mean_steps": round(statistics.mean(paths), 2) if paths else None,
        "max_steps": max(paths) if paths else None,
        "min_steps": min(paths) if paths else None,
        "planner_s_mean": round(statistics.mean(r["plan_s"] for r in rows), 2) if rows else None,
    }


def run(data: Path, out: Path, handcoded: int) -> dict:
    """Replay every game's golden path; returns (and writes) the results."""
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {folder: [] for folder in FOLDERS}
    hand_rows: list[dict] = []
    engine = {"steps": 0, "seconds": 0.0, "resets": 0, "reset_seconds": 0.0}
    result: dict = {}

    def write() -> None:
        result.clear()
        result.update(
            benchmark="alfworld",
            created_at=utc_now().isoformat(),
            code_version=code_version(),
            machine={
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
            cap=CAP,
            expert="planner",
            seconds=round(time.perf_counter() - started, 1),
            engine_steps_per_s=round(engine["steps"] / engine["seconds"], 2)
            if engine["seconds"]
            else None,
            engine_reset_s=round(engine["reset_seconds"] / engine["resets"], 2)
            if engine["resets"]
            else None,
            folders={
                folder: {
                    "all": _summary(folder_rows),
                    "by_task_type": {
                        task: _summary([r for r in folder_rows if r["task_type"] == task])
                        for task in ALFWORLD_TASK_TYPES
                    },
                }
                for folder, folder_rows in rows.items()
            },
            eto_test_list_matches=sorted(r["game"] for r in rows["valid_unseen"])
            == sorted(eto_alfworld_games())
            if len(rows["valid_unseen"]) == len(eto_alfworld_games())
            else None,
            handcoded=[
                {k: r[k] for k in ("game", "task_type", "steps", "success", "seconds")}
                for r in hand_rows
            ],
            games=rows,
        )
        atomic_write_json(out, result)

    config = AlfworldConfig(data_dir=data, expert="planner", golden_max_steps=CAP)
    with AlfWorldEnv(config) as env:
        for task in ALFWORLD_TASK_TYPES:
            games = game_files(env.root, task)
            for variation, (folder, path) in enumerate(games):
                if folder not in FOLDERS:
                    continue
                instance = TaskInstance("alfworld", task, variation, "test")
                tick = time.perf_counter()
                env.reset(instance)
                engine["resets"] += 1
                engine["reset_seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                gold = env.gold_actions()
                plan_s = time.perf_counter() - tick
                success, steps = False, 0
                tick = time.perf_counter()
                for action in gold[:CAP]:
                    outcome = env.step(action)
                    steps += 1
                    if outcome.done:
                        success = outcome.success
                        break
                engine["steps"] += steps
                engine["seconds"] += time.perf_counter() - tick
                rows[folder].append(
                    {
                        "game": game_id(path),
                        "task_type": task,
                        "variation": variation,
                        "plan_length": len(gold),
                        "steps": steps,
                        "success": success,
                        "plan_s": round(plan_s, 2),
                    }
                )
                print(f"{game_id(path)}: {'ok' if success else 'FAIL'} {steps} steps", flush=True)
                write()
            unseen = [p for f, p in games if f == "valid_unseen"][:handcoded]
            for path in unseen:
                tick = time.perf_counter()
                actions = expert_actions(path, "handcoded")
                hand_rows.append(
                    {
                        "game": game_id(path),
                        "task_type": task,
                        "steps": len(actions),
                        "success": bool(actions),
                        "seconds": round(time.perf_counter() - tick, 1),
                    }
                )
                print(f"{game_id(path)}: handcoded {len(actions)} steps", flush=True)
                write()
    write()
    return result


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="directory holding json_2.1.1/")
    parser.add_argument("--handcoded", type=int, default=2, help="handcoded games per type")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.data is not None:
        result = run(args.data, args.out, args.handcoded)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            result = run(unpack_games(ARCHIVE, Path(scratch)), args.out, args.handcoded)
    for folder, table in result["folders"].items():
        print(folder, table["all"])
    print(f"engine {result['engine_steps_per_s']} steps/s → {args.out}")


if __name__ == "__main__":
    main()
