"""The text-environment interface every environment implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from stepflow.data.trajectory import Split, instance_key


@dataclass(frozen=True, order=True)
class TaskInstance:
    """One task instance: a task type and a variation of an environment, with its split."""

    env: str
    task_type: str
    variation: int
    split: Split = "train"

    @property
    def key(self) -> str:
        """Identity across files (independent of the split label)."""
        return instance_key(self.env, self.task_type, self.variation)


@dataclass
class StepResult:
    """What the environment answered to one action.

    `reward` is the task progress in [0, 1] (score / 100, failures clipped to 0);
    `score` is the raw simulator score; `failed` marks a task the agent can no longer win.
    """

    observation: str
    reward: float
    score: float
    done: bool
    success: bool
    failed: bool = False
    valid: bool = True
    info: dict = field(default_factory=dict)


class EnvCrashed(RuntimeError):
    """The simulator process died and could not be brought back."""


class TextEnv(ABC):
    """A text environment with a fixed task space. Use as a context manager; always closed."""

    name: str
    start_score: float = 0.0  # the task's score right after reset (some tasks start above 0)
    restarts: int = 0  # times the simulator process was restarted after dying
    golden_max_steps: int | None = None  # golden paths must reach the goal within it
    gold_expert: str | None = None  # which expert the last gold_actions() followed, if several

    @abstractmethod
    def reset(self, instance: TaskInstance) -> tuple[str, str]:
        """Start `instance`; return (instruction, first observation)."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Execute one action."""

    @abstractmethod
    def valid_actions(self) -> list[str]:
        """Actions the environment accepts now (may be a large set)."""

    @abstractmethod
    def gold_actions(self) -> list[str]:
        """The expert's action sequence for the current instance."""

    def restore(self, instance: TaskInstance, actions: Sequence[str]) -> StepResult | None:
        """Bring `instance` to the state after `actions` by resetting it and replaying them
        (exact for deterministic simulators such as ScienceWorld). Returns the last result."""
        self.reset(instance)
        result = None
        for action in actions:
            result = self.step(action)
        return result

    @abstractmethod
    def close(self) -> None:
        """Release every resource (processes, sockets)."""

    def __enter__(self) -> TextEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
