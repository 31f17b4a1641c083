"""Output locks: two runs never write the same output directories at once.

A stage process holds an exclusive `flock` on each of its output directories
(`paths.data`, `paths.models`, `paths.metrics`, `paths.reports`, resolved to absolute
paths) while it runs. A second process that would write one of them is refused at once
with the holder's pid and stage, instead of interleaving its files with the first run's.
The kernel drops the locks when a process dies (even by SIGKILL), so nothing is left to
clean up. Runs with their own `paths` (or their own working directory) run side by side.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from stepflow.config import PathsConfig
from stepflow.llm.embedded import cache_root

F = TypeVar("F", bound=Callable[..., Any])
_HELD: dict[Path, int] = {}  # paths this process holds -> nesting depth


class OutputsBusy(RuntimeError):
    """Another process is writing the same outputs."""


def lock_dir() -> Path:
    """Where the lock files live (one per output directory, named by its path's hash)."""
    return cache_root() / "locks"


def output_dirs(paths: PathsConfig) -> list[Path]:
    """The absolute output directories of a run, in a fixed order."""
    return sorted(
        {Path(p).resolve() for p in (paths.data, paths.models, paths.metrics, paths.reports)}
    )


@contextmanager
def _lock_one(directory: Path, stage: str) -> Iterator[None]:
    if directory in _HELD:  # the same process, a nested stage: already ours
        _HELD[directory] += 1
        try:
            yield
        finally:
            _HELD[directory] -= 1
        return
    lock_dir().mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(directory).encode()).hexdigest()[:24]
    fd = os.open(lock_dir() / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise OutputsBusy(
                f"{directory} is being written by another run (pid {holder.get('pid', '?')}, "
                f"stage {holder.get('stage', '?')}, since {holder.get('since', '?')}); "
                "wait for it, or give this run its own paths.data/models/metrics/reports"
            ) from None
        holder = {"pid": os.getpid(), "stage": stage, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"directory": str(directory), **holder}).encode(), 0)
        _HELD[directory] = 1
        try:
            yield
        finally:
            del _HELD[directory]
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


@contextmanager
def outputs_lock(paths: PathsConfig, stage: str) -> Iterator[None]:
    """Hold every output directory of `paths` for `stage`; OutputsBusy when one is taken."""
    with ExitStack() as stack:
        for directory in output_dirs(paths):
            stack.enter_context(_lock_one(directory, stage))
        yield


def holds_outputs(stage: str) -> Callable[[F], F]:
    """Decorate a stage function whose first argument is the run's Params: it runs holding
    the run's outputs (`outputs_lock`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(params, *args, **kwargs):
            with outputs_lock(params.paths, stage):
                return fn(params, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing), waiting while another
    process holds it; for short critical sections such as creating a shared store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
