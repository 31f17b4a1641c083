"""ScienceWorld (PyPI `scienceworld`): the simulator's bundled JAR on a local JVM.

One JVM per environment object. The simulator is deterministic for a task, variation and
simplification, so a JVM that dies mid-episode is restarted and the episode's actions are
replayed to restore its state before the next step runs.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Literal

from stepflow.envs.base import EnvCrashed, StepResult, TaskInstance, TextEnv

log = logging.getLogger(__name__)
# py4j logs every refused connection of a dead JVM at ERROR; stepflow handles those itself.
logging.getLogger("py4j").setLevel(logging.CRITICAL)

ENV_NAME = "scienceworld"
INVALID_OBSERVATIONS = ("No known action matches that input.",)
# The simulator's own move limit is not the agent's step limit ("look around" is not a
# move); stepflow enforces per-task step limits itself, so the JVM limit is set out of reach.
_JVM_STEP_LIMIT = 100_000
# A JVM's default heap is a quarter of the machine's memory, and an idle-collected heap
# keeps growing: at 8 episodes in parallel the JVMs outgrew 8 GiB on a 24 GiB machine. One
# simulator needs far less (find-* tasks run in a 256 MiB heap); the serial collector keeps
# GC threads off the cores the model uses. A user's own JVM options take precedence.
JVM_OPTIONS = "-Xmx512m -XX:+UseSerialGC"
_USER_JVM_OPTIONS = ("JDK_JAVA_OPTIONS", "JAVA_TOOL_OPTIONS")
OfficialSplit = Literal["train", "dev", "test"]
_AMBIGUOUS = "Ambiguous request"
_CHOICE = re.compile(r"^(\d+):\s*(.*)$")
_OBSERVATION_ONLY = re.compile(r"^(look around|look at .+|look in .+|inventory|task|read .+)$")


def observation_only(action: str) -> bool:
    """Whether an action only observes (it leaves the world as it was)."""
    return bool(_OBSERVATION_ONLY.match(" ".join(action.lower().split())))


_LOCATION = re.compile(
    r"^(?:You (?:teleport|move) to the (?P<moved>[^.\n]+)\."
    r"|This (?:room|outside location) is called the (?P<seen>[^.\n]+)\.)"
)


def location(observation: str) -> str | None:
    """The location an observation puts the agent in (a move, or a look around), if any."""
    found = _LOCATION.match(observation.strip())
    return (found["moved"] or found["seen"]).strip() if found else None


def sorted_choices(observation: str) -> tuple[str, list[str] | None]:
    """An ambiguous-request observation with its options sorted and renumbered, and the
    options in the simulator's order (None when no option is listed)."""
    head, options = [], []
    for line in observation.splitlines():
        match = _CHOICE.match(line.strip())
        if match:
            options.append(match.group(2))
        elif not options:
            head.append(line)
    if not options:
        return observation, None
    listed = [f"{n}:\t{text}" for n, text in enumerate(sorted(options))]
    return "\n".join([*head, *listed]), options


class ScienceWorldEnv(TextEnv):
    """ScienceWorld behind the TextEnv interface."""

    name = ENV_NAME

    def __init__(self, simplification: str = "easy", max_restarts: int = 3) -> None:
        self.simplification = simplification
        self.max_restarts = max_restarts
        self.restarts = 0
        self._sim = None
        self._instance: TaskInstance | None = None
        self._actions: list[str] = []
        self._choices: list[str] | None = None  # options of an ambiguous request, JVM order
        self._start()

    # -- lifecycle ---------------------------------------------------------------------
    def _start(self) -> None:
        from scienceworld import ScienceWorldEnv as Simulator

        if not any(os.environ.get(name) for name in _USER_JVM_OPTIONS):
            os.environ["JDK_JAVA_OPTIONS"] = JVM_OPTIONS  # read by the `java` launcher
        self._sim = Simulator("", envStepLimit=_JVM_STEP_LIMIT)

    def java_process(self):
        """The JVM's Popen handle (tests use it to inject a crash)."""
        return None if self._sim is None else self._sim._gateway.java_process

    def alive(self) -> bool:
        """Whether the JVM is running."""
        proc = self.java_process()
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        """Shut the JVM down (killing it if it does not exit)."""
        if self._sim is None:
            return
        proc = self.java_process()
        try:
            self._sim.close()
        except Exception:
            log.debug("scienceworld gateway shutdown failed", exc_info=True)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait(timeout=5)
        self._sim = None

    def _restart(self) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise EnvCrashed(f"scienceworld JVM died {self.restarts} times; giving up")
        log.warning("scienceworld JVM is gone; restarting (restart %d)", self.restarts)
        self.close()
        self._start()
        if self._instance is not None:
            actions = list(self._actions)
            self._load(self._instance)
            for action in actions:
                self._sim.step(action)
            self._actions = actions

    def _call(self, fn):
        """Run `fn()` against the simulator; a dead JVM is restarted and `fn` retried once.

        `fn` must look up `self._sim` when called, so that a retry reaches the new JVM.
        """
        from py4j.protocol import Py4JError

        if not self.alive():
            self._restart()
        try:
            return fn()
        except (Py4JError, OSError):
            if self.alive():
                raise
            self._restart()
            return fn()

    # -- task space ----------------------------------------------------------------------
    def task_types(self) -> list[str]:
        """Every task type the simulator knows."""
        return list(self._call(lambda: self._sim.get_task_names()))

    def variations(self, task_type: str, split: OfficialSplit) -> list[int]:
        """Variation indices of the official train/dev/test split of a task type."""
        if task_type not in self.task_types():
            raise ValueError(f"unknown ScienceWorld task type {task_type!r}")

        def fetch() -> list[int]:
            self._sim.load(task_type, 0, self.simplification, generateGoldPath=False)
            getter = {
                "train": self._sim.get_variations_train,
                "dev": self._sim.get_variations_dev,
                "test": self._sim.get_variations_test,
            }[split]
            return sorted(int(v) for v in getter())

        return self._call(fetch)

    # -- episode -------------------------------------------------------------------------
    def _load(self, instance: TaskInstance) -> None:
        self._sim.load(
            instance.task_type, instance.variation, self.simplification, generateGoldPath=True
        )

    def reset(self, instance: TaskInstance) -> tuple[str, str]:
        """Load a task instance; return (task description, first observation)."""
        if instance.env != ENV_NAME:
            raise ValueError(f"{instance.key}: not a ScienceWorld instance")

        def start() -> tuple[str, str]:
            self._load(instance)
            observation, info = self._sim.reset()
            self.start_score = float(info["score"])
            return self._sim.get_task_description(), observation

        self._instance = instance
        self._actions = []
        self._choices = None
        return self._call(start)

    def step(self, action: str) -> StepResult:
        """Execute an action; reward = score / 100, a negative score is a failed task."""
        if self._instance is None:
            raise RuntimeError("step() before reset()")
        observation, done, info = self._call(lambda: self._exchange(action))
        self._actions.append(action)
        score = float(info["score"])
        failed = score < 0
        return StepResult(
            observation=observation,
            reward=max(0.0, min(score, 100.0)) / 100.0,
            score=score,
            done=bool(done) or failed,
            success=score >= 100,
            failed=failed,
            valid=observation.strip() not in INVALID_OBSERVATIONS,
            info={"moves": info["moves"]},
        )

    def _exchange(self, action: str) -> tuple[str, bool, dict]:
        """Send one action to the JVM. The simulator lists the options of an ambiguous
        request in an order that varies between JVM runs; they are shown sorted, and a
        numeric answer is translated back to the simulator's numbering, so that episodes
        are reproducible."""
        sent = action
        if self._choices is not None and action.strip().isdigit():
            picked = int(action.strip())
            ordered = sorted(self._choices)
            if picked < len(ordered):
                sent = str(self._choices.index(ordered[picked]))
        observation, _delta, done, info = self._sim.step(sent)
        self._choices = None
        if observation.startswith(_AMBIGUOUS):
            observation, self._choices = sorted_choices(observation)
        return observation, done, info

    def valid_actions(self) -> list[str]:
        """The simulator's valid action-object combinations in the current state."""
        return list(self._call(lambda: self._sim.get_valid_action_object_combinations()))

    def gold_actions(self) -> list[str]:
        """The simulator's gold action sequence for the current instance."""
        if self._instance is None:
            raise RuntimeError("gold_actions() before reset()")
        return list(self._call(lambda: self._sim.get_gold_action_sequence()))
