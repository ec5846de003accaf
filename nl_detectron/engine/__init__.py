"""Training: the trainer and the multi-process launcher."""

from .launch import launch
from .trainer import Trainer, main_metric

__all__ = ["Trainer", "launch", "main_metric"]
