"""Where the visualised images come from: an image file or a registered dataset."""

from pathlib import Path
from typing import Any, Union

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

from ..errors import UserInputError

__all__ = ["dataset_record", "dataset_records", "read_rgb_image"]

# Prefixes of the datasets detectron2 registers on import; left out of "registered datasets"
# hints so that the user's own datasets are visible.
_BUILTIN_PREFIXES = ("coco_", "keypoints_coco_", "lvis_", "cityscapes_", "voc_", "ade20k_")


def read_rgb_image(path: Union[str, Path]) -> np.ndarray:
    """An image file as an ``(H, W, 3)`` uint8 RGB array (EXIF orientation applied)."""
    if not Path(path).is_file():
        raise UserInputError(f"Image file {str(path)!r} does not exist; pass an image path.")
    try:
        return read_image(str(path), format="RGB")
    except OSError as e:
        raise UserInputError(f"Cannot read image {str(path)!r}: {e}") from e


def dataset_records(name: str) -> list[dict[str, Any]]:
    """The records (detectron2 dataset dicts) of a registered dataset.

    Loading the records also fills the dataset's metadata (e.g. ``thing_classes`` of a COCO json).
    """
    if name not in DatasetCatalog.list():
        own = sorted(n for n in DatasetCatalog.list() if not n.startswith(_BUILTIN_PREFIXES))
        raise UserInputError(
            f"Dataset {name!r} is not registered. Registered (besides detectron2's built-in COCO, "
            f"LVIS, Cityscapes, VOC and ADE20K): {', '.join(own) or 'none'}. Register a "
            "COCO-format dataset with detectron2.data.datasets.register_coco_instances first."
        )
    records = DatasetCatalog.get(name)
    if not records:
        raise UserInputError(f"Dataset {name!r} has no images.")
    return records


def dataset_record(name: str, index: int) -> dict[str, Any]:
    """Record ``index`` of a registered dataset."""
    records = dataset_records(name)
    if not 0 <= index < len(records):
        raise UserInputError(
            f"Image index {index} is out of range for dataset {name!r}, which has "
            f"{len(records)} images; pass an index in [0, {len(records) - 1}]."
        )
    return records[index]
