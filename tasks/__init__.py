"""Prefect tasks wrapping the stepflow stages."""
