"""ALFWorld on the real 2.1.1 games: golden success and path lengths per task type, planner
time and engine speed, over every `valid_seen` and `valid_unseen` game ALFWorld plays.

    python benchmarks/bench_alfworld.py [--data DIR] [--handcoded N] [--workers N] [--resume]

`--data` is a directory holding `json_2.1.1/` (default: the shared archive
`../shared/data/alfworld/json_2.1.1.tar.gz`, extracted into a temporary directory). Each
game's golden path is made as `prepare` makes it (`expert: planner`), replayed in the real
engine and counted a success only if it reaches the goal within ETO's 40 steps. With
`--handcoded N`, ALFWorld's handcoded expert is also played on the first N `valid_unseen`
games of each task type (its path lengths, for comparison). Writes
benchmarks/results/alfworld.json after every game (`--resume` continues a stopped run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from stepflow.config import ALFWORLD_TASK_TYPES, AlfworldConfig
from stepflow.data.jsonl import atomic_write_json
from stepflow.envs.alfworld import (
    AlfWorldEnv,
    data_root,
    expert_actions,
    game_files,
    game_id,
    unpack_games,
)
from stepflow.envs.base import TaskInstance
from stepflow.evaluate.protocols import ETO_STEP_CAPS, eto_alfworld_games
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


_ENV: AlfWorldEnv | None = None


def _worker_env(data: str) -> AlfWorldEnv:
    global _ENV
    if _ENV is None:
        _ENV = AlfWorldEnv(
            AlfworldConfig(data_dir=Path(data), expert="planner", golden_max_steps=CAP)
        )
    return _ENV


def measure(data: str, task: str, variation: int) -> dict:
    """One game: reset, the planner's golden path, its replay within the cap (timed)."""
    env = _worker_env(data)
    path = env.game_file(TaskInstance("alfworld", task, variation, "test"))
    instance = TaskInstance("alfworld", task, variation, "test")
    tick = time.perf_counter()
    env.reset(instance)
    reset_s = time.perf_counter() - tick
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
    return {
        "game": game_id(path),
        "task_type": task,
        "variation": variation,
        "plan_length": len(gold),
        "steps": steps,
        "success": success,
        "plan_s": round(plan_s, 2),
        "reset_s": round(reset_s, 2),
        "step_s": round(time.perf_counter() - tick, 3),
    }


def handcoded_path(data: str, task: str, variation: int) -> dict:
    """ALFWorld's handcoded expert played to the goal on one game (timed)."""
    path = _worker_env(data).game_file(TaskInstance("alfworld", task, variation, "test"))
    tick = time.perf_counter()
    actions = expert_actions(path, "handcoded")
    return {
        "game": game_id(path),
        "task_type": task,
        "steps": len(actions),
        "success": bool(actions),
        "seconds": round(time.perf_counter() - tick, 1),
    }


def run(data: Path, out: Path, handcoded: int, workers: int, resume: bool) -> dict:
    """Replay every game's golden path; returns (and writes) the results."""
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {folder: [] for folder in FOLDERS}
    hand_rows: list[dict] = []
    if resume and out.is_file():
        previous = json.loads(out.read_text())
        rows = {folder: previous["games"].get(folder, []) for folder in FOLDERS}
        hand_rows = previous.get("handcoded", [])
        started -= previous.get("seconds", 0.0)
    done = {r["game"] for folder_rows in rows.values() for r in folder_rows}
    done_hand = {r["game"] for r in hand_rows}
    root = data_root(AlfworldConfig(data_dir=data))
    jobs, hand_jobs = [], []
    for task in ALFWORLD_TASK_TYPES:
        games = game_files(root, task)
        for variation, (folder, path) in enumerate(games):
            if folder in FOLDERS and game_id(path) not in done:
                jobs.append((FOLDERS.index(folder), task, variation))
        unseen = [v for v, (f, _) in enumerate(games) if f == "valid_unseen"][:handcoded]
        hand_jobs += [(task, v) for v in unseen if game_id(games[v][1]) not in done_hand]

    def write() -> dict:
        every = [r for folder_rows in rows.values() for r in folder_rows]
        timed = [r for r in every if "step_s" in r]  # (rows of an earlier version lack it)
        steps = sum(r["steps"] for r in timed)
        step_s = sum(r["step_s"] for r in timed)
        result = {
            "benchmark": "alfworld",
            "created_at": utc_now().isoformat(),
            "code_version": code_version(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
            "workers": workers,
            "cap": CAP,
            "expert": "planner",
            "seconds": round(time.perf_counter() - started, 1),
            "engine_steps_per_s": round(steps / step_s, 2) if step_s else None,
            "engine_reset_s": round(statistics.mean(r["reset_s"] for r in timed), 2)
            if timed
            else None,
            "folders": {
                folder: {
                    "all": _summary(folder_rows),
                    "by_task_type": {
                        task: _summary([r for r in folder_rows if r["task_type"] == task])
                        for task in ALFWORLD_TASK_TYPES
                    },
                }
                for folder, folder_rows in rows.items()
            },
            "eto_test_list_matches": sorted(r["game"] for r in rows["valid_unseen"])
            == sorted(eto_alfworld_games()),
            "handcoded": hand_rows,
            "games": rows,
        }
        atomic_write_json(out, result)
        return result

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        # ETO's test set (valid_unseen) first, then the handcoded expert, then valid_seen,
        # so that a run stopped early has the test set whole
        unseen = [(t, v) for f, t, v in jobs if FOLDERS[f] == "valid_unseen"]
        seen = [(t, v) for f, t, v in jobs if FOLDERS[f] != "valid_unseen"]
        futures = [pool.submit(measure, str(data), task, v) for task, v in unseen]
        hand = [pool.submit(handcoded_path, str(data), task, v) for task, v in hand_jobs]
        futures += [pool.submit(measure, str(data), task, v) for task, v in seen]
        for future in as_completed(futures + hand):
            row = future.result()
            if "plan_s" in row:
                rows[row["game"].split("/")[0]].append(row)
                print(f"{row['game']}: {'ok' if row['success'] else 'FAIL'} {row['steps']} steps")
            else:
                hand_rows.append(row)
                print(f"{row['game']}: handcoded {row['steps']} steps")
            sys.stdout.flush()
            write()
    for folder_rows in rows.values():
        folder_rows.sort(key=lambda r: (r["task_type"], r["variation"]))
    return write()


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="directory holding json_2.1.1/")
    parser.add_argument("--handcoded", type=int, default=2, help="handcoded games per type")
    parser.add_argument("--workers", type=int, default=2, help="engine processes")
    parser.add_argument("--resume", action="store_true", help="keep the games --out holds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    options = (args.out, args.handcoded, args.workers, args.resume)
    if args.data is not None:
        result = run(args.data, *options)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            result = run(unpack_games(ARCHIVE, Path(scratch)), *options)
    for folder, table in result["folders"].items():
        print(folder, table["all"])
    print(f"engine {result['engine_steps_per_s']} steps/s → {args.out}")


if __name__ == "__main__":
    main()
