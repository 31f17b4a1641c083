"""The MLflow UI as a person sees it: a real `mlflow server` on a store, read by headless
Chromium (the page is a JavaScript app, so it is rendered before its text is read).

Used by the tests of what the UI shows and by `docs/screenshot_runs.py`.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(
    store_uri: str, port: int | None = None, timeout: float = 180.0, log_file: Path | None = None
) -> Iterator[str]:
    """`mlflow server` (one worker) on `store_uri` at 127.0.0.1; yields its base URL and stops
    it (and every process it started) on exit."""
    port = port or free_port()
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        # the job executor (GenAI judges, issue detection) is not needed to show runs
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server on {store_uri} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server on {store_uri} not healthy after {timeout}s")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_file:
            out.close()


def chromium() -> str | None:
    """The headless-capable Chromium (or Chrome) on PATH, if any."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _chromium_args(url: str, width: int, height: int, budget_ms: int) -> list[str]:
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found on PATH (Debian: apt-get install chromium)")
    return [
        browser,
        "--headless",
        "--no-sandbox",  # runs as root in containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--run-all-compositor-stages-before-draw",
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={width},{height}",
    ]


def page_text(url: str, budget_ms: int = 20000, timeout: float = 120.0) -> str:
    """The visible text of `url` once its scripts ran for `budget_ms` of virtual time."""
    args = [*_chromium_args(url, 1600, 900, budget_ms), "--dump-dom", url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True)
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", result.stdout, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()


def screenshot(
    url: str,
    out: Path,
    width: int = 1600,
    height: int = 900,
    budget_ms: int = 20000,
    timeout: float = 120.0,
) -> Path:
    """A PNG of `url` as rendered after `budget_ms` of virtual time."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [*_chromium_args(url, width, height, budget_ms), f"--screenshot={out}", url]
    subprocess.run(args, capture_output=True, timeout=timeout, check=True)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return out


def runs_shown(text: str) -> int:
    """How many runs the runs table says it shows (`N matching runs`); 0 when it says none."""
    found = re.search(r"(\d+) matching runs?", text)
    return int(found.group(1)) if found else 0


def check_runs_page(text: str, run_names: list[str], columns: list[str]) -> None:
    """Fail unless the runs page shows runs, among them `run_names`, with `columns`."""
    if runs_shown(text) == 0 or "No runs logged" in text:
        raise AssertionError(f"the runs page shows no runs: {text[:500]}")
    missing = [name for name in [*run_names, *columns] if name not in text]
    if missing:
        raise AssertionError(f"the runs page lacks {missing}: {text[:1500]}")
