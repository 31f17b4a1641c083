"""Evaluating the agents: the `evaluate` stage, its metrics with confidence intervals, the
evaluation protocols (ETO's lists and caps), the comparison report and MLflow run diffs."""
