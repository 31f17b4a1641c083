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
    port = free_port()
    command = [sys.executable, str(OPENAI_COMPAT), "--model", model, "--port", str(port)]
    command += ["--served-name", served_name or model]
    proc = subprocess.Popen(
        [*command, "--api-key-env", KEY_ENV],
        env={**os.environ, KEY_ENV: KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.5)
        yield root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inject(root: str, **fault) -> None:
    """Make the server misbehave on its next chat requests (see openai_compat.py)."""
    httpx.post(f"{root}/admin/faults", json=fault, timeout=5).raise_for_status()


def clear_faults(root: str) -> None:
    """Drop the faults not yet served."""
    httpx.delete(f"{root}/admin/faults", timeout=5).raise_for_status()
