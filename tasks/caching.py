"""Cross-run caching of stage tasks, keyed on their inputs and the code.

The run that produces a stage's outputs stores its result under the key of its inputs; a
later run takes it from the cache only while those outputs exist and were produced by the
same inputs (otherwise it runs again and replaces the record: `cached_unless_stale`), so a
cache hit never leaves a stage without (or with someone else's) outputs.
"""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy

from stepflow.provenance import code_version


class EvaluationCache(CachePolicy):
    """Cache key of an agent's evaluation: its inputs digest (settings + adapter weights)
    and the stepflow code version."""

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs
    ) -> str | None:
        from stepflow.evaluate.evaluation import evaluation_digest

        params, agent = inputs["params"], inputs["agent"]
        try:
            digest = evaluation_digest(params, agent)
        except FileNotFoundError:  # no adapter to evaluate: nothing to key on
            return None
        splits = "+".join(params.evaluation.splits)
        return f"stepflow-evaluate-{agent}-{splits}-{digest}-{code_version()}"


def cached_unless_stale(task: Task, current: bool) -> Task:
    """`task` as it is when its outputs are `current`; otherwise the same task refreshing
    its cache (it runs, whatever is stored under its key, and stores its own result there)."""
    return task if current else task.with_options(refresh_cache=True)
