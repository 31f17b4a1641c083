"""Async access to a (blocking) text environment: every call runs in a worker thread."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

from stepflow.envs.base import StepResult, TaskInstance, TextEnv

T = TypeVar("T")


class AsyncEnv:
    """A TextEnv whose calls are awaited; one episode at a time uses it."""

    def __init__(self, env: TextEnv, executor: Executor | None = None) -> None:
        self.env = env
        self.name = env.name
        self._executor = executor

    async def _run(self, fn: Callable[..., T], *args) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def reset(self, instance: TaskInstance) -> tuple[str, str]:
        """Start `instance`; return (instruction, first observation)."""
        return await self._run(self.env.reset, instance)

    async def step(self, action: str) -> StepResult:
        """Execute one action."""
        return await self._run(self.env.step, action)

    async def valid_actions(self) -> list[str]:
        """Actions the environment accepts now."""
        return await self._run(self.env.valid_actions)

    async def gold_actions(self) -> list[str]:
        """The expert's action sequence for the current instance."""
        return await self._run(self.env.gold_actions)

    async def restore(self, instance: TaskInstance, actions: Sequence[str]) -> StepResult | None:
        """Reset `instance` and replay `actions`."""
        return await self._run(self.env.restore, instance, list(actions))

    async def close(self) -> None:
        """Release the environment."""
        await self._run(self.env.close)
