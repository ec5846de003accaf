"""COCO evaluation with the fastest correct COCO API installed."""

from .coco_backend import (
    COCO_BACKENDS,
    COCOBackend,
    available_coco_backends,
    evaluate_predictions_on_coco,
    get_coco_backend,
)
from .coco_evaluator import FastCOCOEvaluator

__all__ = [
    "COCO_BACKENDS",
    "COCOBackend",
    "FastCOCOEvaluator",
    "available_coco_backends",
    "evaluate_predictions_on_coco",
    "get_coco_backend",
]
