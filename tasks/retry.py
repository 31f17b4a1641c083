"""Which failures are worth a retry."""

from __future__ import annotations

from stepflow.envs.base import EnvCrashed
from stepflow.llm.base import BackendError
from stepflow.rollout.engine import EpisodeErrors

TRANSIENT = (EnvCrashed, BackendError, EpisodeErrors, ConnectionError, TimeoutError)


def transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry simulator crashes, endpoint faults and failed episodes,
    never configuration or data errors."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:  # anything else is not worth a retry
        return False
    return False
