"""Progress of long work, when stderr is a log file rather than a terminal."""

from __future__ import annotations

from stepflow.progress import progress_bar


def test_a_log_gets_a_line_at_every_tenth_of_the_work(capsys) -> None:
    with progress_bar("golden replays", total=40) as bar:
        for done in range(1, 41):
            bar.note(f"done {done}")
            bar.advance()
    lines = [line for line in capsys.readouterr().err.splitlines() if ": " in line]
    assert lines[:2] == [
        "golden replays: 4/40 in 0 s | done 4",
        "golden replays: 8/40 in 0 s | done 8",
    ]
    assert len(lines) == 10 and lines[-1].startswith("golden replays: 40/40")


def test_a_disabled_bar_prints_nothing(capsys) -> None:
    with progress_bar("episodes", total=3, enabled=False) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""
