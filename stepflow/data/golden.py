"""Golden (expert) trajectories from the simulator's gold action sequences.

A gold sequence is replayed in the real environment and kept only if it reaches full score
(within the environment's `golden_max_steps` when it sets one: ALFWorld); the replay stops
at the step that completes the task (gold paths may carry trailing no-ops).
With compression (ScienceWorld with teleportation), a successful path is shortened —
navigation runs become `teleport to <room>`, no-op actions are dropped — and the shorter
path is replayed in turn; it replaces the original only if it also reaches full score.
Thoughts come from a template, from an LLM (`ThoughtWriter`), or are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from stepflow.agent.prompts import format_observation, format_step, opening_turns
from stepflow.envs.base import TaskInstance, TextEnv
from stepflow.data.trajectory import Provenance, Trajectory, Turn

# off: not tried; compressed: the shorter path replaced the original; unchanged: nothing to
# shorten; fallback: the shorter path did not reach full score, the original is kept
Compression = Literal["off", "compressed", "unchanged", "fallback"]


@dataclass
class GoldReplay:
    """The outcome of replaying a gold action sequence."""

    instance: TaskInstance
    instruction: str
    first_observation: str
    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    gold_length: int = 0
    start_score: float = 0.0
    raw_steps: int | None = None  # steps of the uncompressed replay (compression tried)
    compression: Compression = "off"
    max_steps: int | None = None  # the replay was cut after this many steps
    expert: str | None = None  # which of the environment's experts gave the sequence

    @property
    def final_score(self) -> float:
        """Score after the last replayed action."""
        return self.scores[-1] if self.scores else 0.0

    @property
    def success(self) -> bool:
        """Whether the replay reached full score."""
        return self.final_score >= 100


def _play(replay: GoldReplay, env: TextEnv, actions: Sequence[str]) -> GoldReplay:
    replay.start_score = env.start_score
    for action in actions:
        result = env.step(action)
        replay.actions.append(action)
        replay.observations.append(result.observation)
        replay.scores.append(result.score)
        if result.done:
            break
    return replay


def replay_gold(env: TextEnv, instance: TaskInstance, *, compress: bool = False) -> GoldReplay:
    """Replay the gold sequence of `instance` until the task completes or the sequence ends.

    With `compress`, a successful replay is shortened (`compress_gold`) and the shorter
    path replayed from a fresh reset; it is returned if it reaches full score too."""
    instruction, first_observation = env.reset(instance)
    gold = env.gold_actions()
    cap = env.golden_max_steps
    replay = _play(
        GoldReplay(
            instance,
            instruction,
            first_observation,
            gold_length=len(gold),
            max_steps=cap,
            expert=env.gold_expert,
        ),
        env,
        gold if cap is None else gold[:cap],
    )
    if not compress:
        return replay
    replay.raw_steps = len(replay.actions)
    shorter = compress_gold(replay.actions, replay.observations) if replay.success else None
    if shorter is None or shorter == replay.actions:
        replay.compression = "unchanged"
        return replay
    env.reset(instance)
    candidate = _play(
        GoldReplay(
            instance,
            instruction,
            first_observation,
            gold_length=len(gold),
            raw_steps=len(replay.actions),
            compression="compressed",
        ),
        env,
        shorter,
    )
    if candidate.success:
        return candidate
    replay.compression = "fallback"
    return replay


# -- compression (ScienceWorld, teleportation allowed) ------------------------------------
_OPEN_DOOR = re.compile(r"^open door to (?P<room>.+)$")
_GO = re.compile(r"^go to (?P<room>.+)$")
# observations of actions that changed nothing in the world
_NO_OP = re.compile(
    r"^(?:The .+ is already (?:open|closed)\.|You can't move something into itself\.)$"
)


def compress_gold(actions: Sequence[str], observations: Sequence[str]) -> list[str]:
    """A shorter equivalent of a replayed ScienceWorld path (verify it by replay).

    No-op actions (their observation says nothing changed, e.g. "The door is already
    open.") are dropped; each maximal run of navigation (`open door to X`, `go to X`, and
    no-ops between them) that moves the agent becomes `teleport to <last room>`, followed
    by any door the run opened after its last move."""
    out: list[str] = []
    room: str | None = None  # where the current navigation run has moved the agent
    opened: list[str] = []  # doors the run opened after its last move

    def flush() -> None:
        nonlocal room
        if room is not None:
            out.append(f"teleport to {room}")
        out.extend(opened)
        room = None
        opened.clear()

    for action, observation in zip(actions, observations, strict=True):
        text = " ".join(action.split())
        if _NO_OP.match(observation.strip()):
            continue
        if go := _GO.match(text):
            room = go.group("room")
            opened.clear()
        elif _OPEN_DOOR.match(text):
            opened.append(action)
        else:
            flush()
            out.append(action)
    flush()
    return out


_TEMPLATES: list[tuple[str, str]] = [
    (r"^open door to (?P<x>.+)$", "The way to the {x} is through this door, so I open it."),
    (r"^(?:go|teleport) to (?P<x>.+)$", "Next I go to the {x}."),
    (r"^look around$", "I look around to see what is here."),
    (r"^look at (?P<x>.+)$", "I take a closer look at the {x}."),
    (r"^look in (?P<x>.+)$", "I look inside the {x}."),
    (r"^focus on (?P<x>.+)$", "The {x} is what the task is about, so I focus on it."),
    (r"^move (?P<x>.+?) (?:in inventory )?to (?P<y>.+)$", "I move the {x} to the {y}."),
    (r"^pick up (?P<x>.+)$", "I pick up the {x} to carry it."),
    (r"^put down (?P<x>.+)$", "I put down the {x}."),
    (r"^pour (?P<x>.+) in(?:to)? (?P<y>.+)$", "I pour the {x} into the {y}."),
    (r"^dunk (?P<x>.+) in(?:to)? (?P<y>.+)$", "I dunk the {x} into the {y}."),
    (r"^mix (?P<x>.+)$", "I mix the contents of the {x}."),
    (r"^connect (?P<x>.+) to (?P<y>.+)$", "I connect the {x} to the {y}."),
    (r"^disconnect (?P<x>.+)$", "I disconnect the {x}."),
    (r"^activate (?P<x>.+)$", "I turn on the {x}."),
    (r"^deactivate (?P<x>.+)$", "I turn off the {x}."),
    (r"^use (?P<x>.+) on (?P<y>.+)$", "I use the {x} on the {y}."),
    (r"^read (?P<x>.+)$", "I read the {x}."),
    (r"^open (?P<x>.+)$", "I open the {x}."),
    (r"^close (?P<x>.+)$", "I close the {x}."),
    (r"^wait\d*$", "I wait for things to progress."),
    (r"^inventory$", "I check what I am carrying."),
    (r"^look$", "I look around to see what is here."),
    (r"^take (?P<x>.+) from (?P<y>.+)$", "I take the {x} from the {y}."),
    (r"^examine (?P<x>.+)$", "I take a closer look at the {x}."),
    (r"^(?P<verb>heat|cool|clean) (?P<x>.+) with (?P<y>.+)$", "I {verb} the {x} with the {y}."),
    (r"^search\[(?P<x>.+)\]$", "I search the store for {x}."),
    (r"^click\[buy now\]$", "This product and its options match the instruction, so I buy it."),
    (r"^click\[(?P<x>back to search|< prev|next >)\]$", "I click {x} to look elsewhere."),
    (r"^click\[(?P<x>.+)\]$", "I click {x}."),
]
_COMPILED = [(re.compile(pattern, re.IGNORECASE), text) for pattern, text in _TEMPLATES]


def template_thought(action: str) -> str:
    """A deterministic one-sentence rationale for an action."""
    for pattern, text in _COMPILED:
        match = pattern.match(action.strip())
        if match:
            return text.format(**match.groupdict())
    return f"Next I will {action.strip()}."


class ThoughtWriter(Protocol):
    """Writes a short rationale for each gold action of a replay (e.g. a teacher LLM)."""

    def thoughts(self, replay: GoldReplay) -> list[str]: ...


def golden_thoughts(replay: GoldReplay, mode: str, writer: ThoughtWriter | None = None) -> list:
    """Thoughts for each action of a replay under `golden.thoughts` mode."""
    if mode == "none":
        return [None] * len(replay.actions)
    if mode == "template":
        return [template_thought(action) for action in replay.actions]
    if writer is None:
        raise ValueError("golden.thoughts 'teacher' needs a thought writer (teacher LLM)")
    thoughts = writer.thoughts(replay)
    if len(thoughts) != len(replay.actions):
        raise ValueError(
            f"{replay.instance.key}: thought writer returned {len(thoughts)} "
            f"thoughts for {len(replay.actions)} actions"
        )
    return thoughts


def render_golden(
    replay: GoldReplay,
    thoughts: Sequence[str | None],
    example: str | None,
    provenance: Provenance,
    max_observation_chars: int | None = None,
) -> Trajectory:
    """A golden replay as a ReAct trajectory (every step trained)."""
    instance = replay.instance
    turns = opening_turns(
        instance.env, replay.instruction, replay.first_observation, example, max_observation_chars
    )
    turns[-1] = turns[-1].model_copy(update={"score": replay.start_score})
    for thought, action, observation, score in zip(
        thoughts, replay.actions, replay.observations, replay.scores, strict=True
    ):
        turns.append(
            Turn(
                role="assistant",
                kind="step",
                loss=True,
                action=action,
                content=format_step(thought, action),
            )
        )
        turns.append(
            Turn(
                role="user",
                kind="observation",
                content=format_observation(observation, max_observation_chars),
                score=score,
            )
        )
    score = replay.final_score
    return Trajectory(
        env=instance.env,
        task_type=instance.task_type,
        variation=instance.variation,
        split=instance.split,
        instruction=replay.instruction,
        turns=turns,
        reward=max(0.0, min(score, 100.0)) / 100.0,
        score=score,
        max_score=max(replay.scores, default=None),
        success=replay.success,
        num_steps=len(replay.actions),
        done=True,
        provenance=_with_compression(provenance, replay),
    )


def _with_compression(provenance: Provenance, replay: GoldReplay) -> Provenance:
    """Provenance carrying the raw path length and compression outcome (when tried) and
    the expert that gave the path (when the environment has several)."""
    extra = dict(provenance.extra)
    if replay.raw_steps is not None:
        extra.update(raw_steps=str(replay.raw_steps), compression=replay.compression)
    if replay.expert is not None:
        extra["expert"] = replay.expert
    if extra == provenance.extra:
        return provenance
    return provenance.model_copy(update={"extra": extra})
