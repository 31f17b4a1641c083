"""Prefect flows: one per stage and `step_pipeline` running them all."""

import os

# The pipeline runs offline; Prefect's usage telemetry would only add failing requests (and
# lock contention on the ephemeral server's SQLite database at start-up).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Without a Prefect server each stage starts a temporary one; on a busy machine its start-up
# can outlast Prefect's 20 s default and fail the stage before any work.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
