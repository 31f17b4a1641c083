"""The trajectory schema (versioned, one JSON object per line) and its readers/writers.

A trajectory is a chat: a system prompt, the task instruction as first user turn, then
alternating assistant turns ("Thought: ... Action: ...") and user turns holding the
environment's observation. Each assistant turn has a kind and a loss flag:

- `step`: a correct step (student or expert), trained;
- `erroneous_step`: a student step the teacher judged wrong; kept as context, never trained
  (the `step_nomask` ablation flips this at tokenization time, not in the data);
- `reflection`: the teacher's "Reflection: ... Thought: ... Action: ..." correction, trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepflow.data.jsonl import JsonlAppender, read_records, write_records
from stepflow.provenance import code_version, utc_now

SCHEMA_VERSION = 1

Role = Literal["system", "user", "assistant"]
TurnKind = Literal["system", "instruction", "observation", "step", "erroneous_step", "reflection"]
ASSISTANT_KINDS = ("step", "erroneous_step", "reflection")
Split = Literal["train", "u1", "u2", "dev", "test"]
# Why synthesis stopped an episode before its end (such a trajectory is never kept): a wrong
# step with no correction budget left, a wrong step the teacher had no correction for, a
# correction that was invalid or lowered the score, a wrong step that lost the task when
# rewinding is off.
StopReason = Literal["corrections_exhausted", "no_correction", "bad_correction", "unwinnable"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Turn(_Record):
    """One chat turn. `action` is the action parsed from (and executed for) an assistant turn;
    `score` is the environment's score after that action, on the observation turn answering it
    (on the instruction turn: the score at the start; None where unknown, e.g. imported
    data). Prompts never show it."""

    role: Role
    content: str
    kind: TurnKind
    loss: bool = False
    action: str | None = None
    score: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Turn:
        expected = {"system": ("system",), "user": ("instruction", "observation")}
        allowed = expected.get(self.role, ASSISTANT_KINDS)
        if self.kind not in allowed:
            raise ValueError(f"a {self.role} turn cannot have kind {self.kind!r}")
        if self.loss and self.role != "assistant":
            raise ValueError("only assistant turns can carry loss")
        if self.loss and self.kind == "erroneous_step":
            raise ValueError("an erroneous_step is never trained (loss must be false)")
        if self.score is not None and self.kind not in ("instruction", "observation"):
            raise ValueError("only instruction and observation turns carry a score")
        return self


class EpisodeStats(_Record):
    """Counters of one episode.

    `student_steps` are the turns the student generated (the step limit counts these);
    with a teacher, each is judged and ends up `accepted_steps` or `erroneous_steps`.
    `truncated` turns stopped at the generation limit (never executed). `rewinds` are wrong
    steps taken back because they made the task unwinnable (removed from the conversation).
    Where the wall time went: `prompt_s` building prompts, `llm_s` waiting for the student's
    completions (queued behind other episodes' requests included), `env_s` in the simulator
    (reset, steps, restores), `teacher_s` in the teacher's reviews.
    """

    parse_failures: int = 0
    truncated: int = 0
    invalid_actions: int = 0
    student_steps: int = 0
    accepted_steps: int = 0
    erroneous_steps: int = 0
    rewinds: int = 0
    corrections: int = 0
    teacher_calls: int = 0
    teacher_fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    env_restarts: int = 0
    wall_s: float = 0.0
    prompt_s: float = 0.0
    llm_s: float = 0.0
    env_s: float = 0.0
    teacher_s: float = 0.0
    fitted_prompts: int = 0


class Provenance(_Record):
    """What produced a trajectory."""

    source: Literal["golden", "rollout", "synthesis", "evaluation", "import"]
    created_at: datetime = Field(default_factory=utc_now)
    code_version: str = Field(default_factory=code_version)
    params_hash: str | None = None
    student_model: str | None = None
    teacher: str | None = None
    extra: dict[str, str] = Field(default_factory=dict)


class Trajectory(_Record):
    """One episode in one task instance."""

    schema_version: Literal[1] = SCHEMA_VERSION
    env: str
    task_type: str
    variation: int
    split: Split
    instruction: str
    turns: list[Turn] = Field(min_length=2)
    reward: Annotated[float, Field(ge=0, le=1)]
    score: float
    max_score: float | None = Field(
        default=None,
        description="the highest score after any executed action (ETO's reward is it / 100); "
        "None when no action ran or for records made before the field existed",
    )
    success: bool
    num_steps: int = Field(ge=0)
    done: bool = True
    failure: str | None = None
    stop_reason: StopReason | None = None
    stats: EpisodeStats = Field(default_factory=EpisodeStats)
    provenance: Provenance

    @model_validator(mode="after")
    def _structure(self) -> Trajectory:
        if self.turns[0].role == "system" and self.turns[1].kind != "instruction":
            raise ValueError("the turn after the system prompt must be the instruction")
        if self.turns[0].role not in ("system", "user"):
            raise ValueError("a trajectory starts with a system or user turn")
        previous = None
        for index, turn in enumerate(self.turns):
            if turn.role == "system" and index != 0:
                raise ValueError(f"turn {index}: system turn only allowed first")
            if previous is not None and turn.role == previous and turn.role != "system":
                raise ValueError(f"turn {index}: two {turn.role} turns in a row")
            previous = turn.role
        steps = sum(1 for t in self.turns if t.role == "assistant")
        if steps != self.num_steps:
            raise ValueError(f"num_steps is {self.num_steps} but there are {steps} assistant turns")
        return self

    @property
    def key(self) -> str:
        """Identity of the task instance: `env/task_type/variation`."""
        return instance_key(self.env, self.task_type, self.variation)

    def assistant_turns(self) -> list[Turn]:
        """The assistant turns in order."""
        return [t for t in self.turns if t.role == "assistant"]

    @property
    def own_fraction(self) -> float:
        """Share of the assistant turns that are the student's own accepted steps."""
        return self.stats.accepted_steps / self.num_steps if self.num_steps else 0.0


def instance_key(env: str, task_type: str, variation: int) -> str:
    """Identity of a task instance across files."""
    return f"{env}/{task_type}/{variation}"


def read_trajectories(path: str | Path) -> Iterator[Trajectory]:
    """Validated trajectories of a JSONL file (DataError with file:line on a bad line)."""
    return read_records(path, Trajectory)


def trajectories_of(path: str | Path, keys: Iterable[str]) -> list[Trajectory]:
    """The trajectories of a work log that belong to these instance keys, in key order (not
    the order concurrent episodes finished in, so that what is written from them is the
    same however the episodes were timed)."""
    wanted = set(keys)
    return sorted((t for t in read_trajectories(path) if t.key in wanted), key=lambda t: t.key)


def load_trajectories(*paths: str | Path) -> list[Trajectory]:
    """All trajectories of one or more files."""
    return [t for path in paths for t in read_trajectories(path)]


def write_trajectories(path: str | Path, trajectories: Iterable[Trajectory]) -> int:
    """Write a complete trajectory file atomically."""
    return write_records(path, trajectories)


class TrajectoryLog:
    """An append-resumable trajectory file: finished episodes are appended as they end,
    and a rerun learns which instances are already done.

    With `retry_failed`, episodes recorded as failed (`failure` set) are taken out of the
    file when it is opened (an atomic rewrite), so that the run tries them again; the file
    never holds two records of one instance.
    """

    def __init__(self, path: str | Path, *, retry_failed: bool = False) -> None:
        self.path = Path(path)
        self._appender = JsonlAppender(self.path)
        records = list(read_trajectories(self.path))
        self.retried = [t for t in records if t.failure] if retry_failed else []
        if self.retried:
            self._appender.close()
            write_trajectories(self.path, (t for t in records if not t.failure))
            self._appender = JsonlAppender(self.path)
        kept = (t for t in records if not (retry_failed and t.failure))
        self.done: dict[str, Trajectory] = {t.key: t for t in kept}

    def append(self, trajectory: Trajectory) -> None:
        """Record a finished episode."""
        self._appender.append(trajectory)
        self.done[trajectory.key] = trajectory

    def close(self) -> None:
        """Close the file."""
        self._appender.close()

    def __enter__(self) -> TrajectoryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
