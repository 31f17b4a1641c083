"""Where an artifact came from: code version, time, params hash."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from stepflow import __version__


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
