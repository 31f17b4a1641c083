"""Progress display for long work (rich), silent when disabled or not wanted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """One progress task: `advance(n)` and `note(text)` (extra figures after the bar)."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._task = task_id

    def advance(self, n: float = 1) -> None:
        """Move the bar forward."""
        if self._progress is not None and n:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        """Show extra figures (mean reward, steps/s, ...) next to the bar."""
        if self._progress is not None:
            self._progress.update(self._task, note=text)


@contextmanager
def progress_bar(description: str, total: float | None, enabled: bool = True) -> Iterator[Bar]:
    """A progress bar on stderr with count, elapsed and remaining time."""
    if not enabled:
        yield Bar(None, None)
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, note="")
        yield Bar(progress, task_id)
