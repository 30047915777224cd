"""Training engine: optimizer, learning-rate schedules, exact-resume checkpoints."""
