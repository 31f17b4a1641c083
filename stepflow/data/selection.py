"""Choosing task instances for a run: from the split manifest, or named explicitly."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from stepflow.envs.base import TaskInstance, TextEnv
from stepflow.data.trajectory import Split

if TYPE_CHECKING:
    from stepflow.config import Params

SPLITS: tuple[str, ...] = get_args(Split)


class SelectionError(ValueError):
    """Instances could not be chosen as asked."""


def parse_variations(spec: str) -> list[int]:
    """`"1,2,5-7"` → `[1, 2, 5, 6, 7]` (sorted, no duplicates)."""
    values: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            if sep:
                start, end = int(low), int(high)
                if end < start:
                    raise SelectionError(f"variation range {part!r} is empty")
                values.update(range(start, end + 1))
            else:
                values.add(int(part))
        except ValueError:
            raise SelectionError(f"variations: {part!r} is not a number or a range") from None
    if not values or min(values) < 0:
        raise SelectionError(f"variations {spec!r}: need non-negative numbers like 1,2,5-7")
    return sorted(values)


def select_instances(
    env: str,
    *,
    manifest: Iterable[TaskInstance] = (),
    split: str | None = None,
    task: str | None = None,
    variations: list[int] | None = None,
    limit: int | None = None,
    label: Callable[[str, int], str] | None = None,
) -> list[TaskInstance]:
    """Explicit instances (`task` + `variations`), labelled with their manifest split when
    the manifest has them, else with `split` when given, else by `label(task, variation)`;
    or the manifest's instances of `split` (optionally of one `task`), in manifest order.
    At most `limit` of them."""
    known = {(i.env, i.task_type, i.variation): i for i in manifest}
    if split is not None and split not in SPLITS:
        raise SelectionError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    if variations is not None:
        if task is None:
            raise SelectionError("--variations needs --task")
        chosen = []
        for variation in variations:
            instance = known.get((env, task, variation))
            if instance is None:
                if split is not None:
                    name = split
                elif label is not None:
                    name = label(task, variation)
                else:
                    raise SelectionError(f"{task}/{variation}: no split known; pass --split")
                instance = TaskInstance(env, task, variation, name)  # type: ignore[arg-type]
            chosen.append(instance)
    elif split is not None:
        if not known:
            raise SelectionError(
                "no manifest to take a split from; run the prepare stage or pass "
                "--task and --variations"
            )
        chosen = [
            i
            for i in known.values()
            if i.env == env and i.split == split and (task is None or i.task_type == task)
        ]
    else:
        raise SelectionError("choose instances: --split, or --task with --variations")
    if not chosen:
        raise SelectionError("no instance matches the selection")
    return chosen[:limit] if limit is not None else chosen


class OfficialSplitLabels:
    """Labels variations with the environment's official split (train/dev/test); the
    environment is started on first use and closed by `close()`."""

    def __init__(self, env_factory: Callable[[], TextEnv]) -> None:
        self._factory = env_factory
        self._env: TextEnv | None = None
        self._splits: dict[str, dict[int, str]] = {}

    def __call__(self, task: str, variation: int) -> str:
        if task not in self._splits:
            if self._env is None:
                self._env = self._factory()
            variations = getattr(self._env, "variations", None)
            if variations is None:
                raise SelectionError(f"{self._env.name} has no official splits; pass --split")
            self._splits[task] = {
                v: name for name in ("train", "dev", "test") for v in variations(task, name)
            }
        if variation not in self._splits[task]:
            raise SelectionError(f"{task} has no variation {variation}")
        return self._splits[task][variation]

    def close(self) -> None:
        """Stop the environment if it was started."""
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> OfficialSplitLabels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def choose_instances(
    params: Params,
    *,
    manifest: Path | None = None,
    split: str | None = None,
    task: str | None = None,
    variations: str | None = None,
    limit: int | None = None,
) -> list[TaskInstance]:
    """The instances of params.yaml's environment chosen as `select_instances` does, from the
    split manifest (default `<paths.data>/manifest.json`; none yet: only named instances)
    and `variations` written as `1,2,5-7`; a variation the manifest does not list is
    labelled with `split`, else with the environment's official split."""
    from stepflow.data.splits import load_manifest
    from stepflow.envs import make_env
    from stepflow.method import MANIFEST

    path = manifest or Path(params.paths.data) / MANIFEST
    known = load_manifest(path).select(*SPLITS) if path.is_file() else []
    chosen = parse_variations(variations) if variations is not None else None
    with OfficialSplitLabels(lambda: make_env(params.env)) as label:
        return select_instances(
            params.env.name,
            manifest=known,
            split=split,
            task=task,
            variations=chosen,
            limit=limit,
            label=label,
        )
