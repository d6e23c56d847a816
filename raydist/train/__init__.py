"""Training on Ray Train: the per-worker loop, the driver side, schedules and checkpoints."""
