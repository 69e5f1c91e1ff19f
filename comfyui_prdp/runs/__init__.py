"""A training run on disk: checkpoints, the run folder and its lock, stop requests, plots."""
