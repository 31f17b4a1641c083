"""Text environments behind one interface."""

from __future__ import annotations

from stepflow.config import EnvConfig
from stepflow.envs.base import StepResult, TaskInstance, TextEnv

__all__ = [
    "StepResult",
    "TaskInstance",
    "TextEnv",
    "canonical_wording",
    "location",
    "make_env",
    "observation_only",
]


def make_env(config: EnvConfig) -> TextEnv:
    """Start the environment named in the config (each call owns its own simulator)."""
    if config.name == "scienceworld":
        from stepflow.envs.scienceworld import ScienceWorldEnv

        return ScienceWorldEnv(simplification=config.simplification)
    if config.name == "alfworld":
        from stepflow.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv(config.alfworld)
    if config.name == "webshop":
        from stepflow.envs.webshop import WebShopEnv

        return WebShopEnv(config.webshop)
    raise ValueError(f"env.name: unknown environment {config.name!r}")


def observation_only(env: str, action: str) -> bool:
    """Whether `action` in environment `env` only observes (changes nothing in the world)."""
    if env == "scienceworld":
        from stepflow.envs.scienceworld import observation_only as scienceworld_observation_only

        return scienceworld_observation_only(action)
    if env == "alfworld":
        from stepflow.envs.alfworld import observation_only as alfworld_observation_only

        return alfworld_observation_only(action)
    return False


def canonical_wording(env: str, action: str) -> str:
    """`action` in the one wording the environment's other spellings of the same command map
    to (ALFWorld: `put X in Y`, `move X to Y`, ... → `put X in/on Y`); others unchanged."""
    if env == "alfworld":
        from stepflow.envs.alfworld import canonical_wording as alfworld_canonical_wording

        return alfworld_canonical_wording(action)
    return action


def location(env: str, observation: str) -> str | None:
    """Where an observation of environment `env` says the agent now is (None: it does not
    say, or the environment has no such notion here). ScienceWorld: the room a move or a
    `look around` names."""
    if env == "scienceworld":
        from stepflow.envs.scienceworld import location as scienceworld_location

        return scienceworld_location(observation)
    return None
