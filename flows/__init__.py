"""Prefect flows: one per stage and `step_pipeline` running them all."""

import os

# The pipeline runs offline; Prefect's usage telemetry would only add failing requests (and
# lock contention on the ephemeral server's SQLite database at start-up).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
