"""Datasets bundled with nl_detectron. Importing this package registers them with detectron2."""

from .context import (
    CONTEXT_CLASSES,
    CONTEXT_SPLITS,
    CONTEXT_VARIANTS,
    MARKS_CLASSES,
    MARKS_COLOURS_CLASSES,
    MARKS_SPLITS,
    ensure_context_split,
    register_context_datasets,
)
from .generated import GeneratedSplit, default_generated_root
from .shapes import (
    SHAPES_CLASSES,
    SHAPES_KEYPOINT_CONNECTION_RULES,
    SHAPES_KEYPOINT_FLIP_MAP,
    SHAPES_KEYPOINT_NAMES,
    SHAPES_KEYPOINT_OKS_SIGMAS,
    SHAPES_SPLITS,
    ShapesSplit,
    default_shapes_root,
    ensure_shapes_split,
    generate_shapes_split,
    register_shapes_datasets,
    shapes_split_dir,
)

register_shapes_datasets()
register_context_datasets()

__all__ = [
    "CONTEXT_CLASSES",
    "CONTEXT_SPLITS",
    "CONTEXT_VARIANTS",
    "GeneratedSplit",
    "MARKS_CLASSES",
    "MARKS_COLOURS_CLASSES",
    "MARKS_SPLITS",
    "SHAPES_CLASSES",
    "SHAPES_KEYPOINT_CONNECTION_RULES",
    "SHAPES_KEYPOINT_FLIP_MAP",
    "SHAPES_KEYPOINT_NAMES",
    "SHAPES_KEYPOINT_OKS_SIGMAS",
    "SHAPES_SPLITS",
    "ShapesSplit",
    "default_generated_root",
    "default_shapes_root",
    "ensure_context_split",
    "ensure_shapes_split",
    "generate_shapes_split",
    "register_context_datasets",
    "register_shapes_datasets",
    "shapes_split_dir",
]
