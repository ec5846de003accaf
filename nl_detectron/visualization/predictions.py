"""Ground truth beside a detector's predictions (boxes, masks, keypoints with skeleton).

Both sides are drawn by detectron2's ``Visualizer`` with the dataset's metadata (class names,
``keypoint_names`` and ``keypoint_connection_rules`` for the skeleton): ``draw_dataset_dict`` for
the ground truth, ``draw_instance_predictions`` for the detections above a score threshold.
"""

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from detectron2.data import Metadata, MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image, ImageDraw

from ..errors import UserInputError
from .image_source import dataset_records, read_rgb_image
from .predictor import Predictor

__all__ = [
    "draw_ground_truth_and_prediction",
    "draw_predictions_sheet",
    "visualize_predictions",
]

logger = logging.getLogger(__name__)

_HEADER_PX = 20
_GAP_PX = 8


def draw_ground_truth_and_prediction(
    image_rgb: np.ndarray,
    record: dict[str, Any],
    instances: Instances,
    metadata: Metadata,
    *,
    score_threshold: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """Ground truth (left) and predictions (right) of one image, with a caption above each.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB image.
        record: the image's detectron2 dataset dict (its ``annotations`` are drawn).
        instances: predictions in image pixels (``pred_boxes``, ``scores``, ``pred_classes``
            and, if present, ``pred_masks`` / ``pred_keypoints``).
        metadata: the dataset's metadata.
        score_threshold: predictions scoring below it are not drawn.
        scale: drawing scale of the image (small images read better at 2 or more).

    Returns:
        ``(h + 20, 2 w + 8, 3)`` uint8 RGB image, with ``(h, w) = (H, W) * scale`` (floored).
    """
    if scale <= 0:
        raise UserInputError(f"Drawing scale must be positive; got {scale}.")
    annotations = record.get("annotations", [])
    kept = instances[instances.scores >= score_threshold] if instances.has("scores") else instances
    truth = Visualizer(image_rgb, metadata, scale=scale).draw_dataset_dict(record).get_image()
    predicted = Visualizer(image_rgb, metadata, scale=scale)
    predicted = predicted.draw_instance_predictions(kept).get_image()
    height, width = truth.shape[:2]

    canvas = Image.new("RGB", (2 * width + _GAP_PX, height + _HEADER_PX), "white")
    canvas.paste(Image.fromarray(truth), (0, _HEADER_PX))
    canvas.paste(Image.fromarray(predicted), (width + _GAP_PX, _HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"ground truth ({len(annotations)})", fill="black")
    caption = f"prediction ({len(kept)}, score >= {score_threshold:g})"
    draw.text((width + _GAP_PX + 4, 4), caption, fill="black")
    return np.asarray(canvas)


def _pictures(
    predictor: Predictor,
    dataset_name: str,
    indices: Optional[Sequence[int]],
    num_images: int,
    score_threshold: float,
    scale: float,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, ground truth beside prediction)`` for the chosen images of a dataset."""
    records = dataset_records(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    if indices is None:
        if num_images < 1:
            raise UserInputError(f"Number of images must be >= 1; got {num_images}.")
        indices = range(min(num_images, len(records)))
    bad = [i for i in indices if not 0 <= i < len(records)]
    if bad:
        raise UserInputError(
            f"Image indices {bad} are out of range for dataset {dataset_name!r}, which has "
            f"{len(records)} images; use indices in [0, {len(records) - 1}]."
        )
    for index in indices:
        record = records[index]
        image = read_rgb_image(record["file_name"])
        instances = predictor(image).instances
        yield (
            index,
            draw_ground_truth_and_prediction(
                image, record, instances, metadata, score_threshold=score_threshold, scale=scale
            ),
        )


def visualize_predictions(
    predictor: Predictor,
    dataset_name: str,
    output_dir: Union[str, Path],
    *,
    num_images: int = 4,
    indices: Optional[Sequence[int]] = None,
    score_threshold: float = 0.5,
    scale: float = 1.0,
) -> list[Path]:
    """Write ``<dataset>_<index>.png`` (ground truth beside prediction) for images of a dataset.

    Args:
        predictor: the detector.
        dataset_name: a registered dataset with annotations (e.g. a COCO-format one).
        output_dir: folder for the PNGs (created).
        num_images: the first ``num_images`` images, unless ``indices`` is given.
        indices: indices of the images to draw.
        score_threshold: predictions scoring below it are not drawn.
        scale: drawing scale of the images.

    Returns:
        The written paths, in order.
    """
    output_dir = Path(output_dir)
    pictures = _pictures(predictor, dataset_name, indices, num_images, score_threshold, scale)
    paths = []
    for index, picture in pictures:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"{dataset_name}_{index:04d}.png"
        Image.fromarray(picture).save(path)
        logger.info("Wrote %s", path)
        paths.append(path)
    return paths


def draw_predictions_sheet(
    predictor: Predictor,
    dataset_name: str,
    *,
    num_images: int = 3,
    indices: Optional[Sequence[int]] = None,
    score_threshold: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """Ground truth beside prediction for several images of a dataset, one row per image.

    Arguments as for :func:`visualize_predictions`. Rows narrower than the widest are padded with
    white on the right; rows are 8 pixels apart.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    rows = [
        p
        for _, p in _pictures(predictor, dataset_name, indices, num_images, score_threshold, scale)
    ]
    width = max(row.shape[1] for row in rows)
    sheet = np.full(
        (sum(row.shape[0] + _GAP_PX for row in rows) - _GAP_PX, width, 3), 255, np.uint8
    )
    top = 0
    for row in rows:
        sheet[top : top + row.shape[0], : row.shape[1]] = row
        top += row.shape[0] + _GAP_PX
    return sheet
