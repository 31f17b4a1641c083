"""The reference teacher: judges by the golden trajectory and the environment's answer.

The order of the checks:
1. A step that is unparseable, invalid, lost the task or lowered the score is wrong,
   whatever it matches.
2. A step is right when it is the reference's next action, in any wording the simulator
   reads the same way (case, spacing, articles and final punctuation do not matter, nor
   the environment's other spellings of a command, e.g. ALFWorld's `put X in Y`); or
   one of the next few reference actions (skipping steps that turned out unnecessary, such
   as opening a door that is already open) — but only an action the reference does once
   and that changes the world: a generic or repeatable action (`look around`, `go to
   hallway`) matches only the next reference step; or a valid step that raised the score.
3. Anything else made no progress where the reference would: wrong.

The correction is the reference's next action with the reference's thought, executed where
the student is: when the reference did that step somewhere else (ScienceWorld: another room)
and the student's steps took it away from there, the correction is the reference's move to
that place instead (its next step comes after). The reflection is a deterministic template
or, optionally, written by an LLM from the same facts. When the reference has no step left
to propose, a wrong step gets no correction (the episode stops).

The position in the reference follows the accepted steps of the history: a matched step
moves it past the matched reference step; a valid step that raised the score moves it past
the first reference step that reached exactly that score, or up to the first that went
beyond it (observation turns carry the score). It is
recomputed from the history at every call, so the teacher keeps no per-episode state and is
safe for concurrent episodes and resumed runs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from stepflow.agent.parser import parse_step
from stepflow.agent.prompts import OBSERVATION_PREFIX
from stepflow.data.trajectory import Trajectory, Turn
from stepflow.envs import canonical_wording, location, observation_only
from stepflow.llm.base import ChatBackend
from stepflow.teacher import templates
from stepflow.teacher.base import Judgment, Reason, StepFacts, TeacherStats, clean_reflection

LOOKAHEAD = 3
_ARTICLES = re.compile(r"\b(?:the|a|an)\b")
_WAIT = re.compile(r"^wait\d*$")


@dataclass(frozen=True)
class GoldStep:
    """One step of the reference trajectory; `score` is the score after it, `place` where the
    reference took it (None: unknown)."""

    thought: str | None
    action: str
    score: float | None = None
    place: str | None = None


def normalise(action: str) -> str:
    """Canonical form of an action for comparison: lower case, no articles, single spaces,
    no final punctuation (wordings the simulator reads as the same command)."""
    text = action.strip().lower().rstrip(".!?;,")
    text = _ARTICLES.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def _score_after(turns: list[Turn], index: int) -> float | None:
    """The score the observation following turn `index` holds (None: none recorded)."""
    following = turns[index + 1] if index + 1 < len(turns) else None
    return following.score if following is not None and following.role == "user" else None


def _steps_with_scores(turns: list[Turn]) -> list[tuple[Turn, float | None]]:
    """Assistant turns with an executed action, each with the score its observation holds."""
    return [
        (turn, _score_after(turns, index))
        for index, turn in enumerate(turns)
        if turn.role == "assistant" and turn.action is not None
    ]


def _place(env: str, text: str) -> str | None:
    """Where an observation (or a turn ending with one) says the agent is (None: it does not
    say)."""
    _, marker, observation = text.rpartition(OBSERVATION_PREFIX)
    return location(env, observation if marker else text)


def gold_steps(reference: Trajectory) -> list[GoldStep]:
    """The reference's steps (thought, action, score after it, place) in order."""
    steps: list[GoldStep] = []
    here: str | None = None
    for index, turn in enumerate(reference.turns):
        if turn.role == "user":
            here = _place(reference.env, turn.content) or here
        elif turn.action is not None and turn.kind != "erroneous_step":
            thought = parse_step(turn.content).thought
            steps.append(GoldStep(thought, turn.action, _score_after(reference.turns, index), here))
    return steps


def start_score(turns: list[Turn]) -> float | None:
    """The score before the first action (on the instruction turn), when recorded."""
    return next((t.score for t in turns if t.kind == "instruction"), None)


def current_place(env: str, history: list[Turn], observation: str) -> str | None:
    """Where the student is after its latest step (its observation, else the history's)."""
    told = (_place(env, t.content) for t in reversed(history) if t.role == "user")
    return _place(env, observation) or next((p for p in told if p is not None), None)


def correction_index(gold: list[GoldStep], position: int, here: str | None) -> int:
    """The reference step to propose: the next one (`position`), or, when the reference took
    it in another place than the student's, the reference's last move to that place."""
    needed = gold[position].place
    if here is None or needed is None or here == needed:
        return position
    for index in range(position - 1, -1, -1):
        if gold[index + 1].place == needed and gold[index].place != needed:
            return index
    return position  # the reference never moved there: its start; nothing better to offer


def _generic(env: str, action: str) -> bool:
    return observation_only(env, action) or bool(_WAIT.match(normalise(action)))


class Alignment:
    """Which reference step comes next, given the accepted steps so far."""

    def __init__(self, env: str, gold: list[GoldStep]) -> None:
        self.env = env
        self.gold = gold
        self._keys = [self.key(step.action) for step in gold]
        self._once = {a for a, n in Counter(self._keys).items() if n == 1}

    def key(self, action: str) -> str:
        """What two wordings of the same command have in common (the environment's own
        spellings of a command first, then `normalise`)."""
        return normalise(canonical_wording(self.env, action))

    def match(self, position: int, action: str) -> int | None:
        """Index of the reference step that `action` is, from `position` on."""
        wanted = self.key(action)
        if position < len(self.gold) and self._keys[position] == wanted:
            return position
        if wanted not in self._once or _generic(self.env, action):
            return None
        end = min(position + LOOKAHEAD + 1, len(self.gold))
        for index in range(position + 1, end):
            if self._keys[index] == wanted:
                return index
        return None

    def after_raise(self, position: int, score: float) -> int:
        """The position after a step that raised the score to `score` without matching."""
        for index in range(position, len(self.gold)):
            reached = self.gold[index].score
            if reached is not None and reached >= score:
                # reached exactly: that reference step is done; short of it: still to do
                return index + 1 if reached == score else index
        if any(step.score is not None for step in self.gold):
            return len(self.gold)  # beyond every reference score: nothing left to follow
        return position + 1

    def position(self, history: list[Turn]) -> int:
        """Position after the accepted steps of `history` (the next reference step to do)."""
        position = 0
        previous = start_score(history)
        for turn, score in _steps_with_scores(history):
            if turn.kind != "erroneous_step":
                matched = self.match(position, turn.action or "")
                raised = score is not None and previous is not None and score > previous
                if matched is not None:
                    position = matched + 1
                elif raised:
                    position = self.after_raise(position, score)
            if score is not None:
                previous = score
        return position


def verdict_reason(facts: StepFacts, alignment: Alignment, position: int) -> Reason | None:
    """Why the latest step is wrong, or None when it is fine (checks in the module's order)."""
    if not facts.action:
        return "unparseable"
    if not facts.valid:
        return "invalid"
    if facts.failed:
        return "failed"
    if facts.score < facts.previous_score:
        return "worse"
    if alignment.match(position, facts.action) is not None:
        return None
    if facts.score > facts.previous_score:
        return None
    return "no_progress"


class ReferenceTeacher:
    """Judges with the golden reference; reflections from a template or an LLM."""

    def __init__(
        self,
        prompt_version: str = "v1",
        reflection_backend: ChatBackend | None = None,
        max_new_tokens: int = 96,
    ) -> None:
        self.prompt_version = prompt_version
        self.reflection_backend = reflection_backend
        self.max_new_tokens = max_new_tokens
        self.stats = TeacherStats()
        suffix = f"+{reflection_backend.name}" if reflection_backend else ""
        self.name = f"reference{suffix}"
        templates.load_reflections(prompt_version)  # fail early on a missing template

    async def judge(self, facts: StepFacts, reference: Trajectory) -> Judgment:
        """Judge the latest step of `facts` against `reference`."""
        judgment = await self._judge(facts, reference)
        self.stats.count(judgment)
        return judgment

    async def _judge(self, facts: StepFacts, reference: Trajectory) -> Judgment:
        alignment = Alignment(reference.env, gold_steps(reference))
        position = alignment.position(facts.history)
        reason = verdict_reason(facts, alignment, position)
        if reason is None:
            return Judgment.ok()
        if position >= len(alignment.gold):
            return Judgment(correct=False, reason=reason)  # nothing left to propose
        here = current_place(reference.env, facts.history, facts.observation)
        target = alignment.gold[correction_index(alignment.gold, position, here)]
        reflection = await self.reflect(facts, reason, target)
        return Judgment(
            correct=False,
            reflection=reflection,
            thought=target.thought,
            action=target.action,
            reason=reason,
        )

    async def reflect(self, facts: StepFacts, reason: Reason, target: GoldStep) -> str:
        """The reflection on a wrong step (LLM when configured, falling back to the template)."""
        observation = facts.observation.removeprefix(OBSERVATION_PREFIX).strip()
        template_text = templates.render(
            templates.load_reflections(self.prompt_version)[reason],
            f"reflections.{reason}",
            action=facts.action,
            observation=observation,
            correct_action=target.action,
        )
        if self.reflection_backend is None:
            return template_text
        messages = templates.chat(
            self.prompt_version,
            "reflect",
            instruction=facts.instruction,
            action=facts.action,
            observation=observation,
            reason=template_text,
            correct_action=target.action,
            correct_thought=target.thought or "",
        )
        completion = await self.reflection_backend.complete(
            messages, max_new_tokens=self.max_new_tokens
        )
        self.stats.prompt_tokens += completion.prompt_tokens
        self.stats.completion_tokens += completion.completion_tokens
        text = clean_reflection(completion.text)
        if not text:
            self.stats.malformed += 1
            return template_text
        return text

    async def aclose(self) -> None:
        """Close the reflection backend, if any."""
        if self.reflection_backend is not None:
            await self.reflection_backend.aclose()
