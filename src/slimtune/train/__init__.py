"""Training: the loop, schedules, optimizer groups, callbacks and checkpoints."""
