"""Training: the engine (one loop for every task), the pretraining and fine-tuning tasks, optimizer, train state."""

from cratemae.train.engine import NonFiniteLossError
from cratemae.train.engine import validate_config
from cratemae.train.pretrain import train_and_evaluate

__all__ = ['NonFiniteLossError', 'train_and_evaluate', 'validate_config']
