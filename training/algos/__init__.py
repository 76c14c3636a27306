"""RL objectives, as pure functions of log-probabilities and advantages (no rollouts, no loops)."""
