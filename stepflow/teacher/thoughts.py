"""Golden-trajectory thoughts written by the teacher LLM (`golden.thoughts: teacher`).

With a `budget`, each prompt is fitted to the teacher's context by the rule of
`stepflow.agent.context`: earlier observations elided oldest first, then the oldest steps
left out (the first observation and the last two steps are kept); fitted prompts are
counted in `fitted_prompts`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from stepflow.agent.context import (
    ELIDED_OBSERVATION,
    KEEP_RECENT,
    ContextOverflow,
    TokenCounter,
    fewest,
)
from stepflow.agent.prompts import format_observation
from stepflow.data.golden import GoldReplay, template_thought
from stepflow.llm.base import ChatBackend, Message
from stepflow.teacher import templates

if TYPE_CHECKING:
    from stepflow.config import Params

THOUGHT_TOKENS = 48


class LLMThoughtWriter:
    """Asks an LLM for a one-sentence rationale of each gold action, given the history.

    An empty answer falls back to the deterministic template thought (counted).
    """

    def __init__(
        self,
        backend: ChatBackend,
        prompt_version: str = "v1",
        max_new_tokens: int = THOUGHT_TOKENS,
        *,
        budget: int | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        if (budget is None) != (counter is None):
            raise ValueError("a prompt budget needs a token counter, and vice versa")
        self.backend = backend
        self.prompt_version = prompt_version
        self.max_new_tokens = max_new_tokens
        self.budget = budget
        self.counter = counter
        self.fallbacks = 0
        self.fitted_prompts = 0
        self._loop = asyncio.new_event_loop()

    @classmethod
    def from_params(cls, params: Params, backend: ChatBackend) -> LLMThoughtWriter:
        """The writer of params.yaml's teacher, its prompts fitted to the teacher's context."""
        from stepflow.agent.context import context_budget, token_counter

        llm = params.teacher.llm
        assert llm is not None  # golden.thoughts: teacher needs it (Params validation)
        budget = context_budget(
            params.teacher.max_context_tokens,
            llm,
            THOUGHT_TOKENS,
            "teacher.max_context_tokens",
        )
        counter = token_counter(llm.model, getattr(backend, "tokenizer", None))
        return cls(backend, params.teacher.prompt_version, budget=budget, counter=counter)

    def messages(self, replay: GoldReplay, index: int) -> list[Message]:
        """The prompt for the thought of action `index`, fitted when a budget is set."""
        observations = [format_observation(o, 600) for o in replay.observations[:index]]
        recent = max(0, index - KEEP_RECENT)
        plan = [
            ("elide", i) for i in range(recent) if len(observations[i]) > len(ELIDED_OBSERVATION)
        ]
        plan += [("drop", i) for i in range(recent)]

        def render(count: int) -> list[Message]:
            elided = {i for kind, i in plan[:count] if kind == "elide"}
            dropped = sum(1 for kind, _ in plan[:count] if kind == "drop")
            lines = [format_observation(replay.first_observation, 600)]
            if dropped:
                lines.append(f"({dropped} earlier steps omitted)")
            for i in range(dropped, index):
                observation = ELIDED_OBSERVATION if i in elided else observations[i]
                lines += [f"Action: {replay.actions[i]}", observation]
            return templates.chat(
                self.prompt_version,
                "thought",
                instruction=replay.instruction,
                history="\n".join(lines),
                action=replay.actions[index],
            )

        if self.budget is None or self.counter is None:
            return render(0)
        messages, count = fewest(render, self.counter.count, len(plan), self.budget)
        if count is None:
            raise ContextOverflow(
                f"{replay.instance.key}: the thought prompt of step {index + 1} does not fit "
                f"the teacher's budget of {self.budget} tokens; raise teacher.max_context_tokens"
            )
        self.fitted_prompts += int(count > 0)
        return messages

    async def _one(self, replay: GoldReplay, index: int) -> str:
        messages = self.messages(replay, index)
        completion = await self.backend.complete(messages, max_new_tokens=self.max_new_tokens)
        text = " ".join(completion.text.strip().split("\n", 1)[0].split())
        text = text.removeprefix("Thought:").strip()
        if not text:
            self.fallbacks += 1
            return template_thought(replay.actions[index])
        return text

    def thoughts(self, replay: GoldReplay) -> list[str]:
        """One thought per action of the replay."""

        async def gather() -> list[str]:
            return list(
                await asyncio.gather(*(self._one(replay, i) for i in range(len(replay.actions))))
            )

        return self._loop.run_until_complete(gather())

    def close(self) -> None:
        """Close the backend and the event loop."""
        self._loop.run_until_complete(self.backend.aclose())
        self._loop.close()
