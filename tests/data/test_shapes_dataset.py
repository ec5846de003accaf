"""The bundled shapes dataset: deterministic, atomic, valid COCO annotations, registered."""

from __future__ import annotations

import filecmp
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image

from nl_detectron.data import (
    SHAPES_CLASSES,
    SHAPES_KEYPOINT_FLIP_MAP,
    SHAPES_KEYPOINT_NAMES,
    SHAPES_SPLITS,
    ensure_shapes_split,
    generate_shapes_split,
    register_shapes_datasets,
    shapes_split_dir,
)

SPLIT = replace(SHAPES_SPLITS[1], num_images=24)  # a small copy of the val split


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    return ensure_shapes_split(SPLIT, tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def coco(split_dir) -> dict:
    with open(split_dir / "annotations.json", encoding="utf-8") as f:
        return json.load(f)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_generation_is_deterministic(split_dir, tmp_path):
    again = tmp_path / "again"
    generate_shapes_split(SPLIT, again)
    assert _tree(again) == _tree(split_dir)
    files = [p for p in _tree(split_dir) if (split_dir / p).is_file()]
    match, mismatch, errors = filecmp.cmpfiles(split_dir, again, files, shallow=False)
    assert mismatch == [] and errors == []
    assert len(match) == SPLIT.num_images + 1  # images + annotations.json


def test_splits_differ(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    generate_shapes_split(replace(SPLIT, num_images=2), a)
    generate_shapes_split(replace(SPLIT, num_images=2, seed=SPLIT.seed + 1), b)
    assert (a / "images" / "00000.png").read_bytes() != (b / "images" / "00000.png").read_bytes()


def test_mini_split_is_the_start_of_val(tmp_path):
    """Image i depends only on (seed, i): nl_shapes_mini is the first images of nl_shapes_val."""
    splits = {s.name: s for s in SHAPES_SPLITS}
    assert splits["nl_shapes_mini"].seed == splits["nl_shapes_val"].seed
    short, long = replace(SPLIT, num_images=2), replace(SPLIT, num_images=3)
    generate_shapes_split(short, tmp_path / "short")
    generate_shapes_split(long, tmp_path / "long")
    for name in ("00000.png", "00001.png"):
        assert filecmp.cmp(tmp_path / "short/images" / name, tmp_path / "long/images" / name, False)
    with (
        open(tmp_path / "short/annotations.json") as f,
        open(tmp_path / "long/annotations.json") as g,
    ):
        a, b = json.load(f), json.load(g)
    assert a["annotations"] == [x for x in b["annotations"] if x["image_id"] <= 2]


def test_generation_is_atomic(tmp_path):
    final = shapes_split_dir(tmp_path, SPLIT)
    # What an interrupted generation leaves: a temporary sibling of a process that is gone.
    leftover = tmp_path / f".{final.name}.tmp-{socket.gethostname()}-{2**22 + 7}.deadbeef"
    (leftover / "images").mkdir(parents=True)
    (leftover / "annotations.json").write_text('{"images": [')
    assert not final.exists()

    assert ensure_shapes_split(SPLIT, tmp_path) == final
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary left
    with open(final / "annotations.json", encoding="utf-8") as f:
        assert len(json.load(f)["images"]) == SPLIT.num_images

    # A complete split is reused as is.
    stamp = (final / "annotations.json").stat().st_mtime_ns
    assert ensure_shapes_split(SPLIT, tmp_path) == final
    assert (final / "annotations.json").stat().st_mtime_ns == stamp


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    import nl_detectron.data.shapes as shapes

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "_render", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_shapes_split(SPLIT, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_annotations_are_valid(split_dir, coco):
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == SPLIT.num_images
    assert [c["name"] for c in coco["categories"]] == list(SHAPES_CLASSES)
    for category in coco["categories"]:
        assert category["keypoints"] == list(SHAPES_KEYPOINT_NAMES)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    for image in coco["images"]:
        with Image.open(split_dir / "images" / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"])
            assert 128 <= min(im.size) and max(im.size) <= 160

    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        width, height = image["width"], image["height"]
        assert ann["iscrowd"] == 0
        (polygon,) = ann["segmentation"]
        xy = np.asarray(polygon).reshape(-1, 2)
        assert len(xy) >= 3
        assert (xy >= 0).all() and (xy[:, 0] <= width).all() and (xy[:, 1] <= height).all()
        x, y, w, h = ann["bbox"]
        assert np.allclose([x, y, x + w, y + h], [*xy.min(0), *xy.max(0)], atol=0.011)
        rle = mask_util.merge(mask_util.frPyObjects([polygon], height, width))
        assert ann["area"] == pytest.approx(float(mask_util.area(rle)))
        # A filled shape, not a sliver (the rasterised area may exceed the box by a pixel row).
        assert 0.3 * w * h < ann["area"] <= (w + 2) * (h + 2)

        keypoints = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
        assert keypoints.shape == (len(SHAPES_KEYPOINT_NAMES), 3)
        assert (keypoints[:, 2] == 2).all()  # shapes never overlap nor leave the image
        assert ann["num_keypoints"] == len(keypoints)
        assert (keypoints[:, 0] >= x).all() and (keypoints[:, 0] <= x + w).all()
        assert (keypoints[:, 1] >= y).all() and (keypoints[:, 1] <= y + h).all()
        top, bottom, left, right = keypoints[:, :2]
        assert top[1] < bottom[1] and left[0] < right[0]
        # Keypoints lie on the outline: in the mask, next to the background.
        mask = mask_util.decode(rle)
        for kx, ky in keypoints[:, :2]:
            col, row = int(round(kx)), int(round(ky))
            window = mask[max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3]
            assert window.any() and not window.all()


def test_shapes_do_not_overlap(coco):
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    for boxes in by_image.values():
        for i, (x0, y0, w0, h0) in enumerate(boxes):
            for x1, y1, w1, h1 in boxes[i + 1 :]:
                assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0


def test_keypoint_flip_map_matches_horizontal_flip(split_dir):
    """Flipping an annotation with detectron2's flip indices gives the keypoints that the
    definition assigns to the flipped shape."""
    from detectron2.data.datasets import load_coco_json

    from nl_detectron.data.shapes import shape_keypoints

    register_shapes_datasets()
    meta = MetadataCatalog.get("nl_shapes_val")
    assert [tuple(p) for p in meta.keypoint_flip_map] == list(SHAPES_KEYPOINT_FLIP_MAP)
    flip_indices = utils.create_keypoint_hflip_indices(["nl_shapes_val"])
    assert [SHAPES_KEYPOINT_NAMES[i] for i in flip_indices] == ["top", "bottom", "right", "left"]

    records = load_coco_json(str(split_dir / "annotations.json"), str(split_dir / "images"))
    checked = 0
    for record in records[:6]:
        flip = T.TransformList([T.HFlipTransform(record["width"])])
        for ann in record["annotations"]:
            out = utils.transform_instance_annotations(
                dict(ann),
                flip,
                (record["height"], record["width"]),
                keypoint_hflip_indices=flip_indices,
            )
            flipped_polygon = np.asarray(out["segmentation"][0]).reshape(-1, 2)
            expected = shape_keypoints(flipped_polygon)
            # Stored keypoints are rounded to 0.01 px and clipped into the box (<= 0.5 px).
            assert np.abs(out["keypoints"][:, :2] - expected).max() <= 0.52
            checked += 1
    assert checked > 6


def test_registered_metadata(tmp_path, monkeypatch):
    register_shapes_datasets()
    for split in SHAPES_SPLITS:
        meta = MetadataCatalog.get(split.name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(SHAPES_CLASSES)
        assert meta.keypoint_names == list(SHAPES_KEYPOINT_NAMES)
        assert [tuple(p) for p in meta.keypoint_flip_map] == list(SHAPES_KEYPOINT_FLIP_MAP)
        names = set(SHAPES_KEYPOINT_NAMES)
        assert all(a in names and b in names for a, b, _ in meta.keypoint_connection_rules)
        assert meta.json_file.endswith(
            os.path.join(shapes_split_dir("", split).name, "annotations.json")
        )
        assert meta.image_root.endswith("images")


def test_registration_loads_lazily(tmp_path):
    """A dataset registered under a fresh root is generated by DatasetCatalog.get, not before."""
    small = replace(SPLIT, name="nl_shapes_test_lazy", num_images=3)
    register_shapes_datasets(tmp_path, splits=[small])
    try:
        assert list(tmp_path.iterdir()) == []
        dicts = DatasetCatalog.get(small.name)
        assert len(dicts) == 3
        assert (shapes_split_dir(tmp_path, small) / "annotations.json").is_file()
        record = dicts[0]
        assert os.path.isfile(record["file_name"])
        assert all(
            len(a["keypoints"]) == 3 * len(SHAPES_KEYPOINT_NAMES) for a in record["annotations"]
        )
        meta = MetadataCatalog.get(small.name)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    finally:
        DatasetCatalog.remove(small.name)
        MetadataCatalog.remove(small.name)
