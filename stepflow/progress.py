"""Progress display for long work (rich), silent when disabled or not wanted.

On a terminal it is a live bar; written to a file or a pipe (a log, CI, a stage run by DVC
or Prefect), a bar prints a plain line at every tenth of the work and at least once a
minute, so a log shows how far a long stage has come.
"""

from __future__ import annotations

import time
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

LOG_EVERY_S = 60.0


class Bar:
    """One progress task: `advance(n)` and `note(text)` (extra figures after the bar)."""

    def __init__(
        self,
        progress: Progress | None,
        task_id: int | None,
        lines: Console | None = None,
        description: str = "",
        total: float | None = None,
    ) -> None:
        self._progress = progress
        self._task = task_id
        self._lines = lines  # a console that is no terminal: plain progress lines
        self._description = description
        self._total = total
        self._done = 0.0
        self._note = ""
        self._started = self._last_line = time.monotonic()
        self._last_tenth = 0

    def advance(self, n: float = 1) -> None:
        """Move the bar forward."""
        if self._progress is not None and n:
            self._progress.advance(self._task, n)
            self._done += n
            self._maybe_line()

    def note(self, text: str) -> None:
        """Show extra figures (mean reward, steps/s, ...) next to the bar."""
        if self._progress is not None:
            self._progress.update(self._task, note=text)
            self._note = text

    def _maybe_line(self) -> None:
        if self._lines is None:
            return
        now = time.monotonic()
        tenth = int(10 * self._done / self._total) if self._total else 0
        if tenth > self._last_tenth or now - self._last_line >= LOG_EVERY_S:
            self._last_tenth, self._last_line = tenth, now
            total = f"/{self._total:g}" if self._total else ""
            note = f" | {self._note}" if self._note else ""
            self._lines.print(
                f"{self._description}: {self._done:g}{total} in {now - self._started:.0f} s{note}",
                highlight=False,
                soft_wrap=True,
            )


@contextmanager
def progress_bar(description: str, total: float | None, enabled: bool = True) -> Iterator[Bar]:
    """A progress bar on stderr with count, elapsed and remaining time (plain lines when
    stderr is not a terminal)."""
    if not enabled:
        yield Bar(None, None)
        return
    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    )
    lines = None if console.is_terminal else console
    with progress:
        task_id = progress.add_task(description, total=total, note="")
        yield Bar(progress, task_id, lines, description, total)
