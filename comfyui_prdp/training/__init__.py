"""The pieces of the training loop (trainer.py): what an epoch samples (batches), the sampling and
scoring phase, the policy update, the stop and distributed plumbing, and the progress events."""
