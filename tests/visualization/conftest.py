"""Fixtures of the visualization tests: a tiny COCO-format dataset and an image."""

import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image
from viz_helpers import KEYPOINT_NAMES


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> str:
    """Registers ``viz_test_shapes``: 3 images of 80 x 96 pixels, squares with 4 keypoints."""
    name = "viz_test_shapes"
    if name in DatasetCatalog.list():
        return name
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(3):
        pixels = (rng.random((80, 96, 3)) * 60).astype(np.uint8)
        x0, y0, side = 10 + 20 * image_id, 12 + 8 * image_id, 30
        pixels[y0 : y0 + side, x0 : x0 + side] = (220, 180, 40)
        Image.fromarray(pixels).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 96, "height": 80})
        cx, cy = x0 + side / 2, y0 + side / 2
        keypoints = [cx, y0, 2, cx, y0 + side, 2, x0, cy, 2, x0 + side, cy, 2]
        polygon = [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]
        annotations.append(
            {
                "id": image_id + 1,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [x0, y0, side, side],
                "area": side * side,
                "iscrowd": 0,
                "segmentation": [polygon],
                "keypoints": keypoints,
                "num_keypoints": 4,
            }
        )
    categories = [{"id": 1, "name": "square", "keypoints": list(KEYPOINT_NAMES), "skeleton": []}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(coco))
    register_coco_instances(
        name,
        {
            "keypoint_names": KEYPOINT_NAMES,
            "keypoint_flip_map": (("left", "right"),),
            "keypoint_connection_rules": [
                ("top", "left", (255, 0, 0)),
                ("left", "bottom", (0, 255, 0)),
                ("bottom", "right", (0, 0, 255)),
            ],
        },
        str(root / "instances.json"),
        str(root),
    )
    return name


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 100 x 140 RGB image with a bright square."""
    rng = np.random.default_rng(1)
    pixels = (rng.random((100, 140, 3)) * 80).astype(np.uint8)
    pixels[30:70, 60:110] = (240, 200, 60)
    return pixels


# ------------------------------------------------------------------------------------------
# Attention maps
