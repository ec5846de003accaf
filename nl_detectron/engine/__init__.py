"""Training and evaluation entry points: the trainer, config loading and pre-run checks."""

from .config_loader import load_config
from .errors import UserInputError
from .preflight import check_inputs
from .trainer import Trainer, main_metric

__all__ = ["Trainer", "UserInputError", "check_inputs", "load_config", "main_metric"]
