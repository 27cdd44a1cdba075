"""Student trainer: rollouts, teacher client, losses, training loop, evaluation."""
