"""Prefect flows: one per stage and `step_pipeline` running them all."""
