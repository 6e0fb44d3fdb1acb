"""DeepSpeed training loop, checkpoints and metrics (the model knows nothing of this package)."""
