"""Text environments behind one interface."""

from __future__ import annotations

from stepflow.config import EnvConfig
from stepflow.envs.base import StepResult, TaskInstance, TextEnv

__all__ = ["StepResult", "TaskInstance", "TextEnv", "make_env"]


def make_env(config: EnvConfig) -> TextEnv:
    """Start the environment named in the config (each call owns its own simulator)."""
    if config.name == "scienceworld":
        from stepflow.envs.scienceworld import ScienceWorldEnv

        return ScienceWorldEnv(simplification=config.simplification)
    raise ValueError(f"env.name: unknown environment {config.name!r}")
