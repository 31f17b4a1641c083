"""A rollout job: which episodes run, into which file, with which student, settings and
reviewer, in one picklable object.

`RolloutJob.run()` runs the student of params.yaml (or `student`, optionally with a LoRA
adapter) on the job's instances not yet in `output` (stepflow.rollout.engine), every prompt
fitted to the agent's context (stepflow.agent.context), the one-shot examples of a prepared
data directory in the prompts, and a reviewer started where the job runs when it has a
`review` recipe (synthesis: the teacher). `stepflow rollout`, the synthesis and evaluation
stages and each of their shards (stepflow.rollout.shards) are rollout jobs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from stepflow.config import LLMConfig, Params
from stepflow.envs.base import TaskInstance
from stepflow.rollout.engine import RolloutSummary, rollout
from stepflow.rollout.episode import EpisodeSettings, Source
from stepflow.threads import torch_threads

if TYPE_CHECKING:
    from stepflow.rollout.review import JobReviewer, ReviewSetup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutJob:
    """Episodes to run: `instances` into `output` (appended; a rerun resumes).

    `student` defaults to params.yaml's; `params_hash` to the hash of the episode's keys
    (stepflow.rollout.episode.EpisodeSettings); `examples` is a prepared data directory whose
    one-shot examples go into the prompts (None: zero-shot); `review` a recipe for the step
    reviewer; `concurrency` defaults to `rollout.concurrency`; `max_episodes` stops after that
    many new episodes; `name` labels the job in logs and task names (`shard 2/4`).
    """

    params: Params
    instances: tuple[TaskInstance, ...]
    output: Path
    student: LLMConfig | None = None
    adapter: Path | None = None
    source: Source = "rollout"
    params_hash: str | None = None
    examples: Path | None = None
    review: ReviewSetup | None = None
    concurrency: int | None = None
    max_episodes: int | None = None
    progress: bool = True
    name: str = "rollout"

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(self.instances))
        object.__setattr__(self, "output", Path(self.output))

    def shard(
        self, instances: tuple[TaskInstance, ...], output: Path, index: int, count: int
    ) -> RolloutJob:
        """Shard `index` of `count`: these instances into their own file, without a bar."""
        return replace(
            self,
            instances=instances,
            output=output,
            progress=False,
            name=f"shard {index + 1}/{count}",
        )

    def run(self) -> RolloutSummary:
        """Run the episodes of the instances not yet in `output`; return the totals (with the
        teacher's name and counters when the job has a reviewer)."""
        settings = EpisodeSettings.from_params(
            self.params, source=self.source, params_hash=self.params_hash
        )
        reviewer = self.review.start() if self.review is not None else None
        with torch_threads(self.params.rollout.threads):
            summary = asyncio.run(self._run(settings, reviewer))
        if reviewer is not None:
            summary.teacher, summary.teacher_stats = reviewer.name, reviewer.stats
        return summary

    async def _run(self, settings: EpisodeSettings, reviewer: JobReviewer | None):
        from stepflow.agent.context import prompt_fitter
        from stepflow.data.prepare import example_for, load_examples
        from stepflow.envs import make_env
        from stepflow.llm import make_backend

        params = self.params
        llm = self.student or params.student
        examples = load_examples(self.examples) if self.examples is not None else {}
        backend = make_backend(llm, adapter=self.adapter)
        try:
            fitter = prompt_fitter(params, llm, getattr(backend, "tokenizer", None))
            log.info(
                "agent prompts fitted to %d tokens (counted with the %s)",
                fitter.budget,
                fitter.counter.name,
            )
            return await rollout(
                self.instances,
                backend,
                self.output,
                env_factory=functools.partial(make_env, params.env),
                settings=replace(settings, prompt_fit=fitter),
                concurrency=self.concurrency or params.rollout.concurrency,
                example_for=functools.partial(example_for, examples) if examples else None,
                reviewer=reviewer,
                max_episodes=self.max_episodes,
                progress=self.progress,
                episode_attempts=params.rollout.episode_attempts,
            )
        finally:
            await backend.aclose()
            if reviewer is not None:
                await reviewer.aclose()
