"""MLflow tracking: every MLflow call of stepflow goes through this package.

- `experiment`: the store and experiment runs go to, its tags and saved view, UI links;
- `runs`: one parent run per pipeline run, one nested run per stage;
- `records`: what a stage records on its run (metrics, datasets, artifacts, the results
  table) and finding runs again;
- `ui`: an MLflow UI server and its runs page rendered in headless Chromium (docs, tests).

The first three rather than one module: together they are over 450 lines, and each concern
is read and changed on its own. Callers use the names re-exported here (`tracking.stage_run`,
...).
"""

from stepflow.tracking.experiment import (
    AGENTS_VIEW,
    AGENTS_VIEW_NAME,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_NOTE,
    HEADLINE_METRICS,
    NOTE_TAG,
    PIPELINE_RUN_NAME,
    RESULTS_TABLE,
    VIEW_TAG_PREFIX,
    agents_view_state,
    configure,
    run_url,
    runs_view_url,
    saved_view_state,
    ui_base,
)
from stepflow.tracking.records import (
    active_run_id,
    find_run,
    log_artifact,
    log_artifacts,
    log_dataset,
    log_metrics,
    log_results,
    log_to_active_run,
)
from stepflow.tracking.runs import (
    DVC_STAGE_ENV,
    FINAL_STAGE,
    PIPELINE_ENV,
    end_pipeline_run,
    flatten,
    pipeline_run,
    pipeline_state,
    stage_run,
    stages_run_by_dvc,
)

__all__ = [
    "AGENTS_VIEW",
    "AGENTS_VIEW_NAME",
    "DVC_STAGE_ENV",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_NOTE",
    "FINAL_STAGE",
    "HEADLINE_METRICS",
    "NOTE_TAG",
    "PIPELINE_ENV",
    "PIPELINE_RUN_NAME",
    "RESULTS_TABLE",
    "VIEW_TAG_PREFIX",
    "active_run_id",
    "agents_view_state",
    "configure",
    "end_pipeline_run",
    "find_run",
    "flatten",
    "log_artifact",
    "log_artifacts",
    "log_dataset",
    "log_metrics",
    "log_results",
    "log_to_active_run",
    "pipeline_run",
    "pipeline_state",
    "run_url",
    "runs_view_url",
    "saved_view_state",
    "stage_run",
    "stages_run_by_dvc",
    "ui_base",
]
