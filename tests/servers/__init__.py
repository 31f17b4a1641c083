"""Real local servers the tests talk to, and helpers to start and steer them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

OPENAI_COMPAT = Path(__file__).parent / "openai_compat.py"
KEY_ENV = "STEPFLOW_TEST_ENDPOINT_KEY"
KEY = "test-key-not-a-secret-3f9a"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def openai_server(
    *, model: str = "embedded", served_name: str | None = None, timeout_s: float = 180
) -> Iterator[str]:
    """Run `openai_compat.py` over `model` (served as `served_name`, default `model`),
    requiring the key of KEY_ENV; yield its root URL."""
    with openai_servers(1, model=model, served_name=served_name, timeout_s=timeout_s) as roots:
        yield roots[0]


@contextmanager
def openai_servers(
    count: int, *, model: str = "embedded", served_name: str | None = None, timeout_s: float = 180
) -> Iterator[list[str]]:
    """`count` servers as `openai_server` (replicas of one model), started together; yield
    their root URLs."""
    procs: list[subprocess.Popen] = []
    roots: list[str] = []
    try:
        for _ in range(count):
            port = free_port()
            command = [sys.executable, str(OPENAI_COMPAT), "--model", model, "--port", str(port)]
            command += ["--served-name", served_name or model, "--api-key-env", KEY_ENV]
            procs.append(
                subprocess.Popen(
                    command,
                    env={**os.environ, KEY_ENV: KEY},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
            roots.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout_s
        for proc, root in zip(procs, roots, strict=True):
            _wait_healthy(proc, root, deadline)
        yield roots
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, root: str, deadline: float) -> None:
    """Wait until the server at `root` answers /health; fail when it exits or time is up."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {root} did not start")
        time.sleep(0.5)


def inject(root: str, **fault) -> None:
    """Make the server misbehave on its next chat requests (see openai_compat.py)."""
    httpx.post(f"{root}/admin/faults", json=fault, timeout=5).raise_for_status()


def clear_faults(root: str) -> None:
    """Drop the faults not yet served."""
    httpx.delete(f"{root}/admin/faults", timeout=5).raise_for_status()


def requests_seen(root: str) -> list[dict]:
    """The chat requests the server received, oldest first: `at` (monotonic seconds),
    `messages`, `status` (the status answered)."""
    response = httpx.get(f"{root}/admin/requests", timeout=5)
    response.raise_for_status()
    return response.json()


def forget_requests(root: str) -> None:
    """Empty the server's request log."""
    httpx.delete(f"{root}/admin/requests", timeout=5).raise_for_status()
