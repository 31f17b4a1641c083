"""The LLM teacher (the paper's): an LLM judges each step against the reference.

The answer must be one JSON object (`{"verdict": "correct"}` or a wrong verdict with
reflection, thought and action). The reflection is cleaned like every LLM-written
reflection (`clean_reflection`: no "Reflection:" label, no Thought/Action lines, one plain
paragraph) and one that is empty once cleaned makes the answer malformed. Malformed answers
are retried up to `max_retries`; after that the configured fallback decides (treat the step
as correct, or ask the reference teacher) and the fallback is counted.

The judge prompt is fitted to the teacher's context (`budget` prompt tokens, counted with
`counter`) by the rule of `stepflow.agent.context`: the history's earlier observations are
elided oldest first, then its oldest steps are left out, then the reference's observations
and then its steps, farthest from the student's current step first; the latest step, the
last two history steps and the three reference steps nearest the student are always shown.
Fitted prompts are counted in `TeacherStats.fitted_prompts`.

Over 300 lines, one module: the judge's prompt, its fitting to the context and the parsing
of its answer with retries and fallback are one protocol.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from stepflow.agent.context import (
    ELIDED_OBSERVATION,
    KEEP_RECENT,
    ContextOverflow,
    TokenCounter,
    fewest,
)
from stepflow.agent.parser import clean_action
from stepflow.agent.prompts import OBSERVATION_PREFIX
from stepflow.data.trajectory import Trajectory, Turn
from stepflow.llm.base import ChatBackend, Message
from stepflow.teacher import templates
from stepflow.teacher.base import Judgment, StepFacts, TeacherStats, clean_reflection, strip_label
from stepflow.teacher.reference import ReferenceTeacher

log = logging.getLogger(__name__)

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class MalformedAnswer(ValueError):
    """The teacher's answer is not the JSON object the prompt asks for."""


class TeacherAnswer(BaseModel):
    """The structured answer of the LLM teacher."""

    model_config = ConfigDict(extra="ignore")

    verdict: Literal["correct", "wrong"]
    reflection: str | None = None
    thought: str | None = None
    action: str | None = None

    @model_validator(mode="after")
    def _complete_when_wrong(self) -> TeacherAnswer:
        if self.verdict == "wrong":
            if self.action and "\n" in self.action.strip():
                raise ValueError("'action' must be a single command")
            self.reflection = clean_reflection(self.reflection)
            if self.thought is not None:
                self.thought = clean_reflection(strip_label(self.thought, "thought"))
            self.action = clean_action(strip_label(self.action, "action"))
            for name in ("reflection", "action"):
                if not getattr(self, name):
                    raise ValueError(f"a 'wrong' verdict needs a non-empty {name!r} (once cleaned)")
        return self


def parse_answer(text: str) -> TeacherAnswer:
    """Parse a teacher answer strictly: one JSON object, optionally in a ```json fence."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    if not stripped.startswith("{"):
        raise MalformedAnswer(f"not a JSON object: {text[:80]!r}")
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise MalformedAnswer(f"invalid JSON ({exc.msg}): {text[:80]!r}") from None
    try:
        return TeacherAnswer.model_validate(data)
    except ValidationError as exc:
        raise MalformedAnswer(exc.errors()[0]["msg"]) from None


def render_reference(reference: Trajectory) -> str:
    """The reference trajectory as numbered action/observation lines."""
    return _render_steps(reference.turns[2:])


def _render_steps(
    turns: list[Turn], elided: frozenset[int] = frozenset(), dropped: frozenset[int] = frozenset()
) -> str:
    """Numbered steps; `elided` observations show the marker, `dropped` steps (assistant
    turn indexes, with their observation) collapse into one "(steps a-b omitted)" line."""
    lines: list[str] = []
    skipped: list[int] = []
    step = 0

    def flush() -> None:
        if skipped:
            span = (
                f"step {skipped[0]}" if len(skipped) == 1 else f"steps {skipped[0]}-{skipped[-1]}"
            )
            lines.append(f"({span} omitted)")
            skipped.clear()

    for index, turn in enumerate(turns):
        if turn.role == "assistant":
            step += 1
            if index in dropped:
                skipped.append(step)
                continue
            flush()
            tag = " (judged wrong)" if turn.kind == "erroneous_step" else ""
            lines.append(f"{step}. {turn.content.strip()}{tag}")
        elif turn.role == "user" and index - 1 not in dropped:
            content = ELIDED_OBSERVATION if index in elided else turn.content.strip()
            lines.append(f"   {content}")
    flush()
    return "\n".join(lines) if lines else "(nothing yet)"


def _elidable(turns: list[Turn]) -> list[int]:
    return [
        i
        for i, t in enumerate(turns)
        if t.role == "user" and len(t.content.strip()) > len(ELIDED_OBSERVATION)
    ]


def _steps(turns: list[Turn]) -> list[int]:
    return [i for i, t in enumerate(turns) if t.role == "assistant" and i + 1 < len(turns)]


def judge_reductions(
    history: list[Turn], reference: list[Turn], position: int
) -> list[tuple[str, str, int]]:
    """The judge prompt's reductions in order (see the module docstring): (part, kind, turn
    index) with part "history" or "reference" and kind "elide" or "drop"."""
    recent_steps = _steps(history)[-KEEP_RECENT:] if KEEP_RECENT else []
    recent = {j for i in recent_steps for j in (i, i + 1)}
    plan = [("history", "elide", i) for i in _elidable(history) if i not in recent]
    plan += [("history", "drop", i) for i in _steps(history) if i not in recent]
    numbers = {}
    for i, turn in enumerate(reference):
        if turn.role == "assistant":
            numbers[i] = len(numbers)

    def distance(index: int) -> tuple[int, int]:
        step = numbers.get(index, numbers.get(index - 1, 0))
        return (-abs(step - position), index)

    nearest = sorted(_steps(reference), key=distance)[-(KEEP_RECENT + 1) :]
    kept = {j for i in nearest for j in (i, i + 1)}
    plan += [
        ("reference", "elide", i)
        for i in sorted(_elidable(reference), key=distance)
        if i not in kept
    ]
    plan += [
        ("reference", "drop", i) for i in sorted(_steps(reference), key=distance) if i not in kept
    ]
    return plan


def judge_prompt(
    facts: StepFacts,
    reference: Trajectory,
    prompt_version: str = "v1",
    *,
    budget: int | None = None,
    counter: TokenCounter | None = None,
) -> tuple[list[Message], bool]:
    """The judge prompt of one step, fitted to `budget` tokens (counted with `counter`) by
    the reductions of `judge_reductions`; also whether any was needed. Raises
    `ContextOverflow` when even the fully reduced prompt does not fit."""
    history, steps = facts.history[2:], reference.turns[2:]
    plan = judge_reductions(history, steps, facts.step_index) if budget is not None else []

    def render(count: int) -> list[Message]:
        cut = plan[:count]
        pick = {
            (part, kind): frozenset(i for p, k, i in cut if (p, k) == (part, kind))
            for part in ("history", "reference")
            for kind in ("elide", "drop")
        }
        return templates.chat(
            prompt_version,
            "judge",
            instruction=facts.instruction,
            reference=_render_steps(steps, pick["reference", "elide"], pick["reference", "drop"]),
            history=_render_steps(history, pick["history", "elide"], pick["history", "drop"]),
            thought=facts.thought or "",
            action=facts.action,
            observation=facts.observation.removeprefix(OBSERVATION_PREFIX).strip(),
            previous_score=f"{facts.previous_score:g}",
            score=f"{facts.score:g}",
        )

    if budget is None or counter is None:
        return render(0), False
    messages, count = fewest(render, counter.count, len(plan), budget)
    if count is None:
        raise ContextOverflow(
            f"the judge prompt needs {counter.count(messages)} tokens with the history and "
            f"reference cut to their nearest steps, over the teacher's budget of {budget} "
            f"(counted with the {counter.name}); raise teacher.max_context_tokens or clip "
            "observations (agent.max_observation_chars)"
        )
    return messages, count > 0


class LLMTeacher:
    """Judges with an LLM; malformed answers retried, then the configured fallback."""

    def __init__(
        self,
        backend: ChatBackend,
        *,
        prompt_version: str = "v1",
        max_retries: int = 2,
        fallback: Literal["correct", "reference"] = "reference",
        max_new_tokens: int = 256,
        budget: int | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        if (budget is None) != (counter is None):
            raise ValueError("a judge prompt budget needs a token counter, and vice versa")
        self.backend = backend
        self.budget = budget
        self.counter = counter
        self.prompt_version = prompt_version
        self.max_retries = max_retries
        self.fallback = fallback
        self.max_new_tokens = max_new_tokens
        self.stats = TeacherStats()
        self.reference = ReferenceTeacher(prompt_version)
        self.name = f"llm:{backend.name}"
        templates.load_text(prompt_version, "judge.user.txt")

    def messages(self, facts: StepFacts, reference: Trajectory) -> list[Message]:
        """The judge prompt for one step, fitted to the teacher's context when a budget is
        set (counted in `stats.fitted_prompts`; `ContextOverflow` when it cannot fit)."""
        messages, fitted = judge_prompt(
            facts, reference, self.prompt_version, budget=self.budget, counter=self.counter
        )
        self.stats.fitted_prompts += int(fitted)
        return messages

    async def judge(self, facts: StepFacts, reference: Trajectory) -> Judgment:
        """Ask the LLM; retry malformed answers; fall back when they stay malformed.

        Endpoint failures (after the backend's own retries) propagate: the episode fails.
        """
        messages = self.messages(facts, reference)
        problem = "no answer"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            completion = await self.backend.complete(messages, max_new_tokens=self.max_new_tokens)
            self.stats.prompt_tokens += completion.prompt_tokens
            self.stats.completion_tokens += completion.completion_tokens
            try:
                answer = parse_answer(completion.text)
            except MalformedAnswer as exc:
                self.stats.malformed += 1
                problem = str(exc)
                continue
            judgment = self._to_judgment(answer)
            self.stats.count(judgment)
            return judgment
        log.info(
            "teacher answer unusable after %d attempt(s) (%s); falling back to %s",
            attempt + 1,
            problem,
            self.fallback,
        )
        judgment = await self._fallback(facts, reference)
        self.stats.count(judgment)
        return judgment

    @staticmethod
    def _to_judgment(answer: TeacherAnswer) -> Judgment:
        if answer.verdict == "correct":
            return Judgment.ok()
        return Judgment(
            correct=False,
            reflection=answer.reflection.strip(),
            thought=(answer.thought or "").strip() or None,
            action=answer.action.strip(),
            reason="llm",
        )

    async def _fallback(self, facts: StepFacts, reference: Trajectory) -> Judgment:
        if self.fallback == "correct":
            judgment = Judgment.ok()
        else:
            judgment = await self.reference._judge(facts, reference)
        judgment.fallback = True
        return judgment

    async def aclose(self) -> None:
        """Close the backend."""
        await self.backend.aclose()
