"""The LLM teacher (the paper's): an LLM judges each step against the reference.

The answer must be one JSON object (`{"verdict": "correct"}` or a wrong verdict with
reflection, thought and action). Malformed answers are retried up to `max_retries`; after
that the configured fallback decides (treat the step as correct, or ask the reference
teacher) and the fallback is counted.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from stepflow.agent.prompts import OBSERVATION_PREFIX
from stepflow.llm.base import ChatBackend
from stepflow.teacher import templates
from stepflow.teacher.base import Judgment, StepFacts, TeacherStats
from stepflow.teacher.reference import ReferenceTeacher
from stepflow.trajectory import Trajectory, Turn

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
            for name in ("reflection", "action"):
                value = getattr(self, name)
                if not value or not value.strip():
                    raise ValueError(f"a 'wrong' verdict needs a non-empty {name!r}")
            if "\n" in self.action.strip():
                raise ValueError("'action' must be a single command")
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


def _render_steps(turns: list[Turn]) -> str:
    lines = []
    step = 0
    for turn in turns:
        if turn.role == "assistant":
            step += 1
            tag = " (judged wrong)" if turn.kind == "erroneous_step" else ""
            lines.append(f"{step}. {turn.content.strip()}{tag}")
        elif turn.role == "user":
            lines.append(f"   {turn.content.strip()}")
    return "\n".join(lines) if lines else "(nothing yet)"


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
    ) -> None:
        self.backend = backend
        self.prompt_version = prompt_version
        self.max_retries = max_retries
        self.fallback = fallback
        self.max_new_tokens = max_new_tokens
        self.stats = TeacherStats()
        self.reference = ReferenceTeacher(prompt_version)
        self.name = f"llm:{backend.name}"
        templates.load_text(prompt_version, "judge.user.txt")

    def messages(self, facts: StepFacts, reference: Trajectory) -> list[dict[str, str]]:
        """The judge prompt for one step."""
        return templates.chat(
            self.prompt_version,
            "judge",
            instruction=facts.instruction,
            reference=render_reference(reference),
            history=_render_steps(facts.history[2:]),
            thought=facts.thought or "",
            action=facts.action,
            observation=facts.observation.removeprefix(OBSERVATION_PREFIX).strip(),
            previous_score=f"{facts.previous_score:g}",
            score=f"{facts.score:g}",
        )

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
