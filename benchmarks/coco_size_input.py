"""One COCO-size input for Detectron2's own tools, without COCO: a stand-in for COCO val2017.

Writes ``ROOT/coco/val2017/00000000000{1,2}.jpg``, two 800 x 480 images (deterministic smooth
noise; two, because ``analyze_model.py --tasks activation`` divides by the number of inputs less
one), and the two annotation files Detectron2's builtin ``coco_2017_val`` and
``keypoints_coco_2017_val`` read (``ROOT/coco/annotations/instances_val2017.json`` and
``person_keypoints_val2017.json``: those images, no instances, COCO's categories). With
``DETECTRON2_DATASETS=ROOT`` the COCO Python configs load it unchanged, and their test mapper
(shortest edge 800, longest at most 1333) makes it an 800 x 1333 input, padded to 800 x 1344:
res4 is 50 x 84 (4,200 positions), the paper's COCO size (BENCHMARKS.md, "COCO-size cost with
Detectron2's analyze_model").

    python benchmarks/coco_size_input.py output/coco_size_input
    DETECTRON2_DATASETS=output/coco_size_input python <detectron2>/tools/analyze_model.py \\
        --config-file configs/mask_rcnn_R_50_FPN_1x_nl.py --tasks flop --num-inputs 2 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from detectron2.data.datasets.builtin_meta import (
    COCO_CATEGORIES,
    COCO_PERSON_KEYPOINT_NAMES,
    KEYPOINT_CONNECTION_RULES,
)
from PIL import Image

# Width x height: 800 / 480 = 1333 / 800, so the test mapper's 800-pixel shortest edge makes the
# longest 1333, its cap.
WIDTH, HEIGHT = 800, 480
IMAGE_IDS = (1, 2)


def _image(seed: int = 0) -> Image.Image:
    """Smooth colour noise: a 6 x 10 grid of random colours, resized bicubically."""
    grid = np.random.default_rng(seed).uniform(0, 255, size=(6, 10, 3)).astype(np.uint8)
    return Image.fromarray(grid).resize((WIDTH, HEIGHT), Image.BICUBIC)


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def _annotations(categories: list[dict]) -> dict:
    images = [
        {"id": i, "file_name": _file_name(i), "width": WIDTH, "height": HEIGHT} for i in IMAGE_IDS
    ]
    return {"images": images, "annotations": [], "categories": categories}


def write(root: Path) -> None:
    images, annotations = root / "coco" / "val2017", root / "coco" / "annotations"
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    for image_id in IMAGE_IDS:
        _image(seed=image_id).save(images / _file_name(image_id), quality=95)
    things = [
        {"id": c["id"], "name": c["name"], "supercategory": "thing"}
        for c in COCO_CATEGORIES
        if c["isthing"]
    ]
    names = list(COCO_PERSON_KEYPOINT_NAMES)
    person = {
        "id": 1,
        "name": "person",
        "supercategory": "person",
        "keypoints": names,
        # COCO's skeleton: pairs of 1-based keypoint indices
        "skeleton": [
            [names.index(a) + 1, names.index(b) + 1] for a, b, _ in KEYPOINT_CONNECTION_RULES
        ],
    }
    (annotations / "instances_val2017.json").write_text(json.dumps(_annotations(things)))
    (annotations / "person_keypoints_val2017.json").write_text(json.dumps(_annotations([person])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the directory for DETECTRON2_DATASETS")
    write(parser.parse_args().root)


if __name__ == "__main__":
    main()
