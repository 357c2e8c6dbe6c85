"""Training loops and their machinery (checkpoints, EMA)."""
