"""Checkpoints: loading with a report of what loaded (vanilla checkpoints into NL models),
atomic saves, and the best model of the periodic evaluations."""

from .atomic import AtomicCheckpointer
from .best import BestCheckpointer
from .loading import LoadReport, NonLocalCheckpointer

__all__ = ["AtomicCheckpointer", "BestCheckpointer", "LoadReport", "NonLocalCheckpointer"]
