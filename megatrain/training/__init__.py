"""Training: the DeepSpeed engine, the trainer loop, checkpoints, the LR schedule and metrics."""
