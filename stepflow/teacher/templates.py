"""Versioned teacher prompt templates (`stepflow/templates/teacher/<version>/`)."""

from __future__ import annotations

import functools
from importlib import resources
from string import Template

import yaml


def _template_dir(version: str):
    base = resources.files("stepflow") / "templates" / "teacher" / version
    if not base.is_dir():
        raise ValueError(f"teacher.prompt_version: no templates for version {version!r}")
    return base


@functools.cache
def load_text(version: str, name: str) -> str:
    """The raw text of one template file."""
    path = _template_dir(version) / name
    if not path.is_file():
        raise ValueError(f"teacher templates {version}: missing {name}")
    return path.read_text().strip()


@functools.cache
def load_reflections(version: str) -> dict[str, str]:
    """The reference teacher's deterministic reflections, by reason."""
    return yaml.safe_load(load_text(version, "reflections.yaml"))


def render(text: str, name: str, **fields: object) -> str:
    """Fill `$field` placeholders; a missing field is an error naming the template."""
    try:
        return Template(text).substitute({k: str(v) for k, v in fields.items()})
    except KeyError as exc:
        raise ValueError(f"teacher template {name}: no value for ${exc.args[0]}") from None


def chat(version: str, name: str, **fields: object) -> list[dict[str, str]]:
    """System + user messages of a prompt pair `<name>.system.txt` / `<name>.user.txt`."""
    return [
        {"role": "system", "content": load_text(version, f"{name}.system.txt")},
        {"role": "user", "content": render(load_text(version, f"{name}.user.txt"), name, **fields)},
    ]
