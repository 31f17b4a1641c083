"""Golden-trajectory thoughts written by the teacher LLM (`golden.thoughts: teacher`)."""

from __future__ import annotations

import asyncio

from stepflow.agent.prompts import format_observation
from stepflow.golden import GoldReplay, template_thought
from stepflow.llm.base import ChatBackend
from stepflow.teacher import templates


class LLMThoughtWriter:
    """Asks an LLM for a one-sentence rationale of each gold action, given the history.

    An empty answer falls back to the deterministic template thought (counted).
    """

    def __init__(
        self, backend: ChatBackend, prompt_version: str = "v1", max_new_tokens: int = 48
    ) -> None:
        self.backend = backend
        self.prompt_version = prompt_version
        self.max_new_tokens = max_new_tokens
        self.fallbacks = 0
        self._loop = asyncio.new_event_loop()

    async def _one(self, replay: GoldReplay, index: int) -> str:
        lines = [format_observation(replay.first_observation, 600)]
        for action, observation in zip(
            replay.actions[:index], replay.observations[:index], strict=True
        ):
            lines += [f"Action: {action}", format_observation(observation, 600)]
        messages = templates.chat(
            self.prompt_version,
            "thought",
            instruction=replay.instruction,
            history="\n".join(lines),
            action=replay.actions[index],
        )
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
