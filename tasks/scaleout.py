"""Shards of a stage's episodes as Prefect tasks on the task runner named in params.yaml.

`scaleout.task_runner`: `thread` / `process` (Prefect's own pools), `dask` (prefect-dask:
a LocalCluster of `workers` processes, or the scheduler at `address`) or `ray`
(prefect-ray: a local Ray, or the cluster at `address`). Every shard is one task run;
each worker process owns its simulators and its model (or endpoint client).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from stepflow.config import Params, ScaleoutConfig
from stepflow.progress import progress_bar
from stepflow.rollout.engine import RolloutSummary
from stepflow.rollout.job import RolloutJob
from stepflow.rollout.shards import ShardMap
from tasks.retry import transient


@task(
    name="rollout-shard",
    task_run_name="{job.source} {job.name}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def rollout_shard_task(job: RolloutJob) -> RolloutSummary:
    """Run one shard's episodes into its shard file (resumable)."""
    return job.run()


def _api_url() -> str | None:
    """The Prefect API this process reports to (also the temporary one of ephemeral mode),
    handed to local workers so that they report to it instead of starting their own."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url) if client.api_url else None


def task_runner(cfg: ScaleoutConfig) -> TaskRunner:
    """The Prefect task runner of `scaleout`."""
    if cfg.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    api = _api_url()
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # processes: every worker owns its simulators (JVMs) and its model copy
        cluster = {
            "n_workers": cfg.workers,
            "processes": True,
            "threads_per_worker": 1,
            "dashboard_address": ":0",
        }
        if api:
            cluster["env"] = {"PREFECT_API_URL": api}
        return DaskTaskRunner(cluster_kwargs=cluster)
    from prefect_ray import RayTaskRunner

    if cfg.address:
        return RayTaskRunner(address=cfg.address)
    init = {"num_cpus": cfg.workers, "include_dashboard": False}
    if api:
        init["runtime_env"] = {"env_vars": {"PREFECT_API_URL": api}}
    return RayTaskRunner(init_kwargs=init)


def run_on_task_runner(cfg: ScaleoutConfig, jobs: Sequence[RolloutJob]) -> list[RolloutSummary]:
    """Run the shards as task runs on the configured runner; wait for all of them, then
    raise the first failure (the shards that finished are merged by the caller)."""
    with task_runner(cfg) as runner:
        futures = runner.map(rollout_shard_task, {"job": list(jobs)})
        with progress_bar("shards", len(futures)) as bar:
            pending = list(futures)
            while pending:
                done, not_done = wait(pending, timeout=5)
                for _ in done:
                    bar.advance()
                pending = list(not_done)
        return [future.result() for future in futures]


def shard_map(params: Params) -> ShardMap | None:
    """How a stage of these params runs its shards (None: in process, no fan-out)."""
    if not params.scaleout.fans_out:
        return None
    return functools.partial(run_on_task_runner, params.scaleout)
