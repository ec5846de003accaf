"""Pictures of what a trained model does: non-local attention maps, predictions beside ground
truth, and training curves. The command-line tools in ``tools/`` are thin wrappers of these."""

from .attention import (
    AttentionMap,
    AttentionResult,
    QueryPoint,
    compute_attention_maps,
    draw_attention_maps,
    non_local_blocks,
)
from .curves import RunMetrics, load_metrics, parse_run, plot_metrics
from .image_source import dataset_record, dataset_records, read_rgb_image
from .predictions import draw_ground_truth_and_prediction, visualize_predictions
from .predictor import Prediction, Predictor, inference_config

__all__ = [
    "AttentionMap",
    "AttentionResult",
    "Prediction",
    "Predictor",
    "QueryPoint",
    "RunMetrics",
    "compute_attention_maps",
    "dataset_record",
    "dataset_records",
    "draw_attention_maps",
    "draw_ground_truth_and_prediction",
    "inference_config",
    "load_metrics",
    "non_local_blocks",
    "parse_run",
    "plot_metrics",
    "read_rgb_image",
    "visualize_predictions",
]
