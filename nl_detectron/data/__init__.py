"""Datasets bundled with nl_detectron. Importing this package registers them with detectron2."""

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

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_KEYPOINT_CONNECTION_RULES",
    "SHAPES_KEYPOINT_FLIP_MAP",
    "SHAPES_KEYPOINT_NAMES",
    "SHAPES_KEYPOINT_OKS_SIGMAS",
    "SHAPES_SPLITS",
    "ShapesSplit",
    "default_shapes_root",
    "ensure_shapes_split",
    "generate_shapes_split",
    "register_shapes_datasets",
    "shapes_split_dir",
]
