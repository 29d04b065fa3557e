"""Training: loss, loop, checkpoints, distributed, hyper-parameter search."""
