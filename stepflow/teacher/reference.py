"""The reference teacher: judges by the golden trajectory and the environment's answer.

A student step is wrong when the action was invalid, lost the task or the score, or did not
make progress where the reference would (it is neither the reference's next action — or one
of the next few, skipping steps that turned out unnecessary — nor raised the score). The
correction is the reference's next action with the reference's thought; the reflection is a
deterministic template or, optionally, written by an LLM from the same facts.

Alignment with the reference is recomputed from the history at every call, so the teacher
keeps no per-episode state and is safe for concurrent episodes and resumed runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stepflow.agent.parser import parse_step
from stepflow.agent.prompts import OBSERVATION_PREFIX
from stepflow.llm.base import ChatBackend
from stepflow.teacher import templates
from stepflow.teacher.base import Judgment, Reason, StepFacts, TeacherStats, clean_reflection
from stepflow.trajectory import Trajectory, Turn

LOOKAHEAD = 3


@dataclass(frozen=True)
class GoldStep:
    """One step of the reference trajectory."""

    thought: str | None
    action: str


def normalise(action: str) -> str:
    """Canonical form of an action for comparison."""
    return re.sub(r"\s+", " ", action.strip().lower())


def gold_steps(reference: Trajectory) -> list[GoldStep]:
    """The reference's steps (thought, action) in order."""
    steps = []
    for turn in reference.assistant_turns():
        if turn.kind == "erroneous_step" or turn.action is None:
            continue
        steps.append(GoldStep(parse_step(turn.content).thought, turn.action))
    return steps


def executed_actions(history: list[Turn]) -> list[str]:
    """Actions of the accepted steps in a history (erroneous steps excluded)."""
    return [
        t.action
        for t in history
        if t.role == "assistant" and t.kind != "erroneous_step" and t.action is not None
    ]


def match_ahead(gold: list[GoldStep], position: int, action: str) -> int | None:
    """Index of the gold step within the lookahead window that `action` matches."""
    wanted = normalise(action)
    for index in range(position, min(position + LOOKAHEAD + 1, len(gold))):
        if normalise(gold[index].action) == wanted:
            return index
    return None


def align(gold: list[GoldStep], actions: list[str]) -> int:
    """Position in the reference after the accepted actions (the next gold step to do)."""
    position = 0
    for action in actions:
        matched = match_ahead(gold, position, action)
        if matched is not None:
            position = matched + 1
    return position


def verdict_reason(facts: StepFacts, gold: list[GoldStep], position: int) -> Reason | None:
    """Why the latest step is wrong, or None when it is fine."""
    if not facts.action:
        return "unparseable"
    if not facts.valid:
        return "invalid"
    if facts.failed:
        return "failed"
    if facts.score < facts.previous_score:
        return "worse"
    if match_ahead(gold, position, facts.action) is not None or facts.score > facts.previous_score:
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
        gold = gold_steps(reference)
        position = align(gold, executed_actions(facts.history))
        if position >= len(gold):
            return Judgment.ok()  # nothing left to propose
        reason = verdict_reason(facts, gold, position)
        if reason is None:
            return Judgment.ok()
        target = gold[position]
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
