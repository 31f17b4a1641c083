"""stepflow: STeP agent training (self-reflected trajectories + partial masking) as a pipeline."""

__version__ = "0.1.0"
