"""Cross-run caching of stage tasks, keyed on their inputs and the code.

A key is only offered while the stage's outputs exist and were produced by the same inputs,
so a cache hit never leaves a stage without (or with someone else's) outputs.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import CachePolicy

from stepflow.provenance import code_version


class EvaluationCache(CachePolicy):
    """Cache key of an agent's evaluation: its inputs digest (settings + adapter content)
    and the stepflow code version."""

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs
    ) -> str | None:
        from stepflow.evaluation import current_evaluation

        params, agent = inputs["params"], inputs["agent"]
        digest = current_evaluation(params, agent)
        if digest is None:
            return None
        splits = "+".join(params.evaluation.splits)
        return f"stepflow-evaluate-{agent}-{splits}-{digest}-{code_version()}"
