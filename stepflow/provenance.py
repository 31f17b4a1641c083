"""Where an artifact came from: code version, time, params hash."""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from stepflow import __version__
from stepflow.method import MODEL_CARD


@functools.cache
def code_version() -> str:
    """`<package version>+<git sha>[.dirty]` when in a git checkout, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "stepflow"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}"


def worker_identity() -> dict[str, str]:
    """The process running this code: `host`, `pid` and `process` (its multiprocessing name,
    e.g. `MainProcess`, or `Dask Worker process (from Nanny)` on a Dask worker)."""
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "process": multiprocessing.current_process().name,
    }


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def adapter_digest(adapter: str | Path) -> str:
    """First 12 hex digits of the SHA-256 of a LoRA adapter's weights."""
    return file_sha256(Path(adapter) / "adapter_model.safetensors")[:12]


GENERATION_MARGIN = 16


def trained_turn_tokens(adapter: str | Path) -> int | None:
    """The longest trained assistant turn (tokens) an adapter's model card records, if any."""
    card = Path(adapter) / MODEL_CARD
    if not card.is_file():
        return None
    data = json.loads(card.read_text())
    value = data.get("max_trained_turn_tokens")
    if value is None:
        value = data.get("token_stats", {}).get("max_trained_turn_tokens")
    return int(value) if value else None


def generation_shortfall(
    adapter: str | Path, max_new_tokens: int, margin: int = GENERATION_MARGIN
) -> int:
    """Tokens that `max_new_tokens` lacks to generate the adapter's longest trained turn
    plus `margin` (0 when enough, or when the adapter records no length)."""
    longest = trained_turn_tokens(adapter)
    return 0 if longest is None else max(0, longest + margin - max_new_tokens)
