"""Checks of training data: clear errors for what cannot be trained on, warnings for what is fixed.

Detectron2 fails on bad data deep in its data pipeline (an ``AssertionError`` for an empty dataset
or a polygon with two points, PIL's ``height and width must be > 0`` for a 500 x 1 image, a
``FileNotFoundError`` from a data-loader worker), or silently: 16-bit images become white,
keypoints outside the image become "unlabelled", boxes of zero size disappear. Here:

- refused, with the dataset, the image and the fix: a dataset without images or without a single
  usable annotation, image files that do not exist, cannot be read or are not 8-bit, images too
  elongated to resize, category ids outside ``MODEL.ROI_HEADS.NUM_CLASSES``, keypoint lists of the
  wrong length, and data where most annotations are invalid (a systematic error such as a wrong
  ``bbox_mode`` or keypoints in another scale);
- fixed with a warning that counts them and names examples: boxes of zero or negative size, not
  finite or outside the image (annotation dropped), polygons with fewer than 3 points or zero area
  (polygon dropped; the annotation too when none is left), labelled keypoints outside the image
  (marked unlabelled).

Grayscale, palette and RGBA images are read as colour images by Detectron2 (``read_image``
converts them), and small images are scaled up by ``ResizeShortestEdge``: both train normally.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.build import (
    filter_images_with_few_keypoints,
    filter_images_with_only_crowd_annotations,
)
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError

from ..errors import UserInputError

__all__ = ["CheckedDatasetMapper", "DataInputError", "check_dataset_dicts", "load_train_dicts"]

logger = logging.getLogger(__name__)

# More invalid annotations than this fraction means a systematic problem, not a few bad labels.
MAX_INVALID_FRACTION = 0.5
# Pixel modes that Detectron2's read_image converts to 8-bit colour without losing information.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_EXAMPLES = 3


class DataInputError(UserInputError):
    """A problem with the training or test data (images, annotations), raised where the data is
    loaded, possibly in a data-loader worker.

    PyTorch re-raises an exception from a worker as ``type(e)(text)`` where ``text`` holds the
    worker's traceback; the message is reduced to the original one so that it reads the same
    whatever ``DATALOADER.NUM_WORKERS`` is.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            marker = f"{type(self).__module__}.{type(self).__qualname__}: "
            if marker in message:
                message = message.rsplit(marker, 1)[1].rstrip()
        super().__init__(message)


# ------------------------------------------------------------------------------------------------
# Dataset records
# ------------------------------------------------------------------------------------------------


def load_train_dicts(cfg: CfgNode) -> list[dict]:
    """The training records of ``cfg.DATASETS.TRAIN``, as Detectron2's
    ``get_detection_dataset_dicts`` (same filters), checked by :func:`check_dataset_dicts`.

    Raises:
        DataInputError: see the module docstring.
    """
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise DataInputError(
            "DATASETS.TRAIN is empty: name at least one registered dataset, e.g. "
            "DATASETS.TRAIN \"('nl_shapes_train',)\"."
        )
    proposals = cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None
    try:
        dicts = get_detection_dataset_dicts(
            names, filter_empty=False, min_keypoints=0, proposal_files=proposals
        )
    except AssertionError as e:
        empty = re.search(r"Dataset '(.+)' is empty", str(e))
        if not empty:
            raise
        raise DataInputError(
            f"Dataset {empty.group(1)!r} (DATASETS.TRAIN) has no images: its loader returned an "
            "empty list. Check its annotation file (the 'images' list of a COCO json) and the "
            "paths it was registered with, or train on another dataset."
        ) from None
    if not isinstance(dicts, list):  # a torch Dataset: records are not available to check
        return dicts
    dicts = check_dataset_dicts(
        dicts,
        names=names,
        num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        num_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS if cfg.MODEL.KEYPOINT_ON else 0,
        mask_on=cfg.MODEL.MASK_ON,
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
    )
    has_instances = "annotations" in dicts[0]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and has_instances:
        dicts = filter_images_with_only_crowd_annotations(dicts)
    min_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
    if cfg.MODEL.KEYPOINT_ON and min_keypoints > 0 and has_instances:
        dicts = filter_images_with_few_keypoints(dicts, min_keypoints)
    if not dicts:
        reasons = "with at least one annotation that is not a crowd region"
        if cfg.MODEL.KEYPOINT_ON and min_keypoints > 0:
            reasons += f" and at least {min_keypoints} labelled keypoint(s)"
        raise DataInputError(
            f"No image of {', '.join(map(repr, names))} (DATASETS.TRAIN) can be trained on: "
            f"none has an annotation {reasons} (DATALOADER.FILTER_EMPTY_ANNOTATIONS, "
            "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE). Check the annotations."
        )
    return dicts


def _examples(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_EXAMPLES])
    return shown + (f"; ... ({len(items)} in all)" if len(items) > _EXAMPLES else "")


def _box_xyxy(annotation: dict) -> Optional[np.ndarray]:
    bbox = annotation.get("bbox")
    if bbox is None:
        return None
    mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    try:
        box = np.asarray(bbox, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        return np.full(4, np.nan)
    if mode in (BoxMode.XYXY_REL, BoxMode.XYWH_REL, BoxMode.XYWHA_ABS):
        return box  # not checked
    return np.asarray(BoxMode.convert(box.tolist(), mode, BoxMode.XYXY_ABS), dtype=np.float64)


def _polygon_area(flat: np.ndarray) -> float:
    x, y = flat[0::2], flat[1::2]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def check_dataset_dicts(
    dicts: list[dict],
    *,
    names: Sequence[str],
    num_classes: int,
    num_keypoints: int = 0,
    mask_on: bool = False,
    max_size: int = 0,
    check_files: bool = True,
) -> list[dict]:
    """Check training records; returns them with the fixable problems fixed (see the module
    docstring). Records are changed in place where an annotation is dropped or repaired.

    Args:
        dicts: Detectron2 dataset records of the datasets ``names``.
        num_classes: ``MODEL.ROI_HEADS.NUM_CLASSES``; category ids must be below it.
        num_keypoints: keypoints per instance when the model has a keypoint head, else 0.
        mask_on: whether the model has a mask head (then instances need a valid polygon or RLE).
        max_size: ``INPUT.MAX_SIZE_TRAIN``, to refuse images too elongated to resize.
        check_files: check that every image file exists.

    Raises:
        DataInputError: a problem that cannot be fixed here.
    """
    where = ", ".join(map(repr, names))
    missing, elongated, bad_category, bad_keypoint_count = [], [], [], []
    dropped_boxes, dropped_polygons, dropped_masks, outside_keypoints = [], [], [], []
    total_annotations = total_keypoints = 0
    for record in dicts:
        file_name = record.get("file_name", "")
        if check_files and file_name and not os.path.isfile(file_name):
            missing.append(file_name)
        width, height = record.get("width"), record.get("height")
        if width is not None and height is not None:
            short, long = min(width, height), max(width, height)
            if short < 1 or (max_size > 0 and short * max_size / long < 1):
                elongated.append(f"{file_name} ({width} x {height})")
        kept = []
        for annotation in record.get("annotations", []):
            total_annotations += 1
            name = f"{file_name}, annotation {annotation.get('id', len(kept))}"
            category = annotation.get("category_id")
            if not isinstance(category, (int, np.integer)) or not 0 <= category < num_classes:
                bad_category.append(f"{name}: category_id {category!r}")
                continue
            box = _box_xyxy(annotation)
            if box is not None and not _box_ok(box, width, height):
                dropped_boxes.append(f"{name}: bbox {annotation['bbox']}")
                continue
            if mask_on and not _fix_polygons(annotation, name, dropped_polygons):
                dropped_masks.append(name)
                continue
            if num_keypoints and "keypoints" in annotation:
                points = np.asarray(annotation["keypoints"], dtype=np.float64)
                if points.size != 3 * num_keypoints:
                    bad_keypoint_count.append(f"{name}: {points.size} values")
                    continue
                total_keypoints += int((points[2::3] > 0).sum())
                _fix_keypoints(annotation, points, width, height, name, outside_keypoints)
            kept.append(annotation)
        if "annotations" in record:
            record["annotations"] = kept

    if missing:
        raise DataInputError(
            f"{len(missing)} image file(s) of {where} do not exist: {_examples(missing)}. "
            "Check the image root the dataset was registered with (and DETECTRON2_DATASETS), or "
            "remove these images from the annotations."
        )
    if elongated:
        raise DataInputError(
            f"{len(elongated)} image(s) of {where} are too small or elongated to train on: "
            f"{_examples(elongated)}. Resizing to at most INPUT.MAX_SIZE_TRAIN {max_size} pixels "
            "would leave a side under 1 pixel. Remove them from the dataset (or fix their "
            "width/height in the annotations)."
        )
    if bad_category:
        raise DataInputError(
            f"{len(bad_category)} annotation(s) of {where} have a category id outside "
            f"0..{num_classes - 1} (MODEL.ROI_HEADS.NUM_CLASSES {num_classes}): "
            f"{_examples(bad_category)}. Set MODEL.ROI_HEADS.NUM_CLASSES to the number of "
            "classes, or register the dataset with a thing_dataset_id_to_contiguous_id map."
        )
    if bad_keypoint_count:
        raise DataInputError(
            f"{len(bad_keypoint_count)} annotation(s) of {where} do not have "
            f"{num_keypoints} keypoints (x, y, v: {3 * num_keypoints} values) as "
            f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS says: {_examples(bad_keypoint_count)}."
        )
    invalid = len(dropped_boxes) + len(dropped_masks)
    if total_annotations and invalid > MAX_INVALID_FRACTION * total_annotations:
        hints = []
        if dropped_boxes:
            hints.append("check bbox_mode (XYWH vs XYXY) and that boxes are in pixels of the image")
        if dropped_masks:
            hints.append("a dataset without instance masks needs MODEL.MASK_ON False")
        raise DataInputError(
            f"{invalid} of the {total_annotations} annotations of {where} are invalid "
            f"({len(dropped_boxes)} with a box of zero size or outside the image, "
            f"{len(dropped_masks)} without a valid polygon or RLE mask): "
            f"{_examples(dropped_boxes + dropped_masks)}. That many is a systematic error: "
            f"{'; '.join(hints)}."
        )
    if total_keypoints and len(outside_keypoints) > MAX_INVALID_FRACTION * total_keypoints:
        raise DataInputError(
            f"{len(outside_keypoints)} of the {total_keypoints} labelled keypoints of {where} "
            f"lie outside their image: {_examples(outside_keypoints)}. That many is a "
            "systematic error: check that keypoints are (x, y, v) triples in pixels."
        )
    _warn(
        dropped_boxes,
        f"Dropped {{}} annotation(s) of {where} whose box has zero or "
        "negative size, is not finite or lies outside the image",
    )
    _warn(
        dropped_polygons,
        f"Dropped {{}} polygon(s) of {where} with fewer than 3 points or zero area",
    )
    _warn(
        dropped_masks,
        f"Dropped {{}} annotation(s) of {where} without a valid polygon or RLE "
        "mask (the model has a mask head)",
    )
    _warn(
        outside_keypoints,
        f"Marked {{}} labelled keypoint(s) of {where} that lie outside "
        "their image as unlabelled (v=0): they are not trained on",
    )
    return dicts


def _warn(items: list[str], message: str) -> None:
    if items:
        logger.warning(message.format(len(items)) + f": {_examples(items)}.")


def _box_ok(box: np.ndarray, width: Optional[int], height: Optional[int]) -> bool:
    if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        return False
    if width is not None and height is not None:
        # Clipped to the image, as Detectron2 does, the box must keep some area.
        x0, x1 = np.clip(box[[0, 2]], 0, width)
        y0, y1 = np.clip(box[[1, 3]], 0, height)
        return x1 - x0 > 0 and y1 - y0 > 0
    return True


def _fix_polygons(annotation: dict, name: str, dropped: list[str]) -> bool:
    """Drop the invalid polygons of ``annotation``; False if it has no valid mask left."""
    segmentation = annotation.get("segmentation")
    if segmentation is None:
        return False
    if isinstance(segmentation, dict):  # RLE
        return True
    valid = []
    for polygon in segmentation:
        flat = np.asarray(polygon, dtype=np.float64).reshape(-1)
        if (
            flat.size >= 6
            and flat.size % 2 == 0
            and np.isfinite(flat).all()
            and _polygon_area(flat) > 0
        ):
            valid.append(polygon)
        else:
            dropped.append(f"{name}: polygon of {flat.size // 2} point(s)")
    annotation["segmentation"] = valid
    return bool(valid)


def _fix_keypoints(
    annotation: dict,
    points: np.ndarray,
    width: Optional[int],
    height: Optional[int],
    name: str,
    outside: list[str],
) -> None:
    """Mark labelled keypoints that are not finite or lie outside the image as unlabelled."""
    xy, visibility = points.reshape(-1, 3)[:, :2], points.reshape(-1, 3)[:, 2]
    bad = (visibility > 0) & ~np.isfinite(xy).all(axis=1)
    if width is not None and height is not None:
        # Detectron2's bounds (after it adds 0.5 to COCO's integer pixel indices).
        inside = (xy >= 0).all(axis=1) & (xy[:, 0] <= width) & (xy[:, 1] <= height)
        bad |= (visibility > 0) & ~inside
    if bad.any():
        fixed = points.reshape(-1, 3).copy()
        fixed[bad, 2] = 0
        annotation["keypoints"] = fixed.reshape(-1).tolist()
        for i in np.flatnonzero(bad):
            outside.append(f"{name}: keypoint {i} at ({xy[i, 0]:g}, {xy[i, 1]:g})")


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` that reports unusable images with the file and the fix
    (:class:`DataInputError`) instead of failing inside PIL or NumPy."""

    def __call__(self, dataset_dict: dict) -> Any:
        file_name = dataset_dict.get("file_name", "")
        if file_name:
            _check_image_file(file_name)
        try:
            return super().__call__(dataset_dict)
        except OSError as e:  # decoding: a truncated or corrupt file
            raise DataInputError(_unreadable(file_name, e)) from None
        except SizeMismatchError as e:
            raise DataInputError(
                f"{e} The image file and its annotations disagree: fix width/height in the "
                "annotations or replace the image."
            ) from None
        except ValueError as e:
            if "height and width must be > 0" not in str(e):
                raise
            raise DataInputError(
                f"Image {file_name} cannot be resized by {self.augmentations}: a side would "
                "become 0 pixels. It is too small or elongated (see its width and height); "
                "remove it from the dataset."
            ) from None


def _unreadable(file_name: str, error: Exception) -> str:
    return (
        f"Image {file_name} cannot be read ({type(error).__name__}: {error}). It is not an image "
        "or is truncated: replace it or remove it from the annotations."
    )


def _check_image_file(file_name: str) -> None:
    if not os.path.isfile(file_name):
        raise DataInputError(
            f"Image {file_name} does not exist. Check the image root the dataset was registered "
            "with, or remove the image from the annotations."
        )
    try:
        with Image.open(file_name) as image:  # reads the header only
            mode, size = image.mode, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataInputError(_unreadable(file_name, e)) from None
    if mode not in _EIGHT_BIT_MODES:
        raise DataInputError(
            f"Image {file_name} has pixel mode {mode!r} (16-bit or floating point), which "
            "Detectron2 would clip to 8 bits (mostly white). Convert it to 8-bit RGB or "
            "grayscale."
        )
    if min(size) < 1:
        raise DataInputError(f"Image {file_name} is empty ({size[0]} x {size[1]} pixels).")
