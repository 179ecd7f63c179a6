"""The training engine: optimizer recipe, train state and steps, and the loop."""

from cratemae.train.loop import NonFiniteLossError, train_and_evaluate, validate_config

__all__ = ['NonFiniteLossError', 'train_and_evaluate', 'validate_config']
