"""Bad configs, images and annotations: a clear message naming the problem and the fix (and, from
``tools/train_net.py``, no traceback), or a fix with a warning; never a silently wrong run."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from PIL import Image
from training_runs import TINY_CONFIG, assert_no_traceback, run_env, train_net

from nl_detectron.config import load_config
from nl_detectron.data import SHAPES_SPLITS, ensure_shapes_split, shapes_split_dir
from nl_detectron.data.checks import (
    CheckedDatasetMapper,
    DataInputError,
    check_dataset_dicts,
)
from nl_detectron.engine import Trainer
from nl_detectron.errors import UserInputError

MINI = next(s for s in SHAPES_SPLITS if s.name == "nl_shapes_mini")


# ------------------------------------------------------------------------------------------------
# Config errors. (tests/test_train_net.py checks that train_net prints config errors without a
# traceback.)


def _clean_error(proc, *expected: str) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert_no_traceback(proc)
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]


def test_unknown_config_key_names_the_closest_key():
    with pytest.raises(UserInputError) as info:
        load_config(str(TINY_CONFIG), ["MODEL.NONLOCAL.BACKBONE_POSITION", "['res4:-1']"])
    message = str(info.value)
    assert message.startswith("In the command-line overrides: Non-existent key: ")
    assert "MODEL.NONLOCAL.BACKBONE_POSITION. Did you mean MODEL.NONLOCAL.BACKBONE_POSITIONS?" in (
        message
    )
    with pytest.raises(UserInputError, match=r"MODEL\.BACKBONE_POSITIONS\. Did you mean "):
        load_config(str(TINY_CONFIG), ["MODEL.BACKBONE_POSITIONS", "[]"])  # under the wrong node


def test_unknown_key_in_a_config_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{TINY_CONFIG}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    with pytest.raises(UserInputError) as info:
        load_config(str(config))
    assert f"In config file {config}: Non-existent config key: SOLVER.BASE_LRR." in str(info.value)
    assert "Did you mean SOLVER.BASE_LR?" in str(info.value)


@pytest.mark.slow
def test_non_local_position_out_of_range_is_reported_without_traceback(tmp_path):
    # ResNet-18's res4 has 2 blocks: INDEX must be in -2..2.
    proc = train_net("MODEL.NONLOCAL.BACKBONE_POSITIONS", "['res4:5']", "OUTPUT_DIR", str(tmp_path))
    _clean_error(
        proc,
        "MODEL.NONLOCAL.BACKBONE_POSITIONS entry 'res4:5': res4 has 2 blocks",
        "INDEX must be in -2..2",
    )


# ------------------------------------------------------------------------------------------------
# Corrupted copies of the 16-image split: read in this process, or by train_net through
# NL_DETECTRON_DATA.


@pytest.fixture(scope="module")
def mini_split_dir() -> Path:
    """The generated 16-image split (generated once, where train_net's runs find it)."""
    return ensure_shapes_split(MINI, run_env()["NL_DETECTRON_DATA"])


def _corrupted_copy(source: Path, root: Path) -> Path:
    """A copy of the split under a new data root; returns the split's directory there."""
    target = shapes_split_dir(root, MINI)
    shutil.copytree(source, target)
    return target


def _train_on(root: Path, output_dir: Path, *opts: str):
    return train_net(*opts, "OUTPUT_DIR", str(output_dir), data_root=root)


def _load_from(split: Path, monkeypatch) -> None:
    """Build the training loader of the tiny config with ``nl_shapes_mini`` read from ``split``."""
    from detectron2.data.datasets import load_coco_json

    annotations, images = str(split / "annotations.json"), str(split / "images")
    loader = lambda: load_coco_json(annotations, images, MINI.name)  # noqa: E731
    monkeypatch.setitem(DatasetCatalog.data, MINI.name, loader)
    Trainer.build_train_loader(load_config(str(TINY_CONFIG)))


def test_missing_image_is_named_before_training(mini_split_dir, tmp_path, monkeypatch):
    split = _corrupted_copy(mini_split_dir, tmp_path / "data")
    (split / "images" / "00003.png").unlink()
    with pytest.raises(
        DataInputError, match=r"1 image file\(s\) of 'nl_shapes_mini' do not exist.*00003\.png"
    ):
        _load_from(split, monkeypatch)


@pytest.mark.slow
def test_truncated_image_found_by_a_data_loader_worker_is_named(mini_split_dir, tmp_path):
    split = _corrupted_copy(mini_split_dir, tmp_path / "data")
    for image in (split / "images").iterdir():  # every image, so the first batch meets one
        image.write_bytes(image.read_bytes()[:200])
    proc = _train_on(tmp_path / "data", tmp_path / "out", "DATALOADER.NUM_WORKERS", "1")
    _clean_error(proc, "cannot be read", "is truncated: replace it or remove it")
    assert "DataLoader worker" not in proc.stderr  # the worker's wrapping is removed


def test_dataset_without_images_is_refused(mini_split_dir, tmp_path, monkeypatch):
    split = _corrupted_copy(mini_split_dir, tmp_path / "data")
    coco = json.loads((split / "annotations.json").read_text())
    coco["images"], coco["annotations"] = [], []
    (split / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(
        DataInputError, match=r"Dataset 'nl_shapes_mini' \(DATASETS\.TRAIN\) has no images"
    ):
        _load_from(split, monkeypatch)


# ------------------------------------------------------------------------------------------------
# In process: the model builder, the record checks and the mapper.


def test_frozen_bn_in_the_non_local_blocks_is_a_user_error():
    cfg = load_config(str(TINY_CONFIG), ["MODEL.NONLOCAL.NORM", "FrozenBN"])
    with pytest.raises(
        UserInputError, match=r'MODEL\.NONLOCAL\.NORM = "FrozenBN" is not supported'
    ):
        Trainer.build_model(cfg)


def _record(file_name: str, width: int = 64, height: int = 48, **annotation) -> dict:
    base = {
        "bbox": [10.0, 10.0, 20.0, 20.0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 1,
        "segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]],
        "keypoints": [20.0, 10.5, 2, 20.0, 29.5, 2, 10.5, 20.0, 2, 29.5, 20.0, 2],
        "iscrowd": 0,
    }
    base.update(annotation)
    return {
        "file_name": file_name,
        "width": width,
        "height": height,
        "image_id": 1,
        "annotations": [base],
    }


def _check(records: list[dict], **kwargs) -> list[dict]:
    args = {"names": ["test"], "num_classes": 3, "num_keypoints": 4, "mask_on": True}
    args.update(kwargs)
    return check_dataset_dicts(records, check_files=False, **args)


def test_degenerate_boxes_and_polygons_are_dropped_with_a_warning(caplog):
    good = _record("good.png")
    records = [copy.deepcopy(good) for _ in range(9)] + [
        _record("zero_width.png", bbox=[10.0, 10.0, 0.0, 20.0]),
        _record("outside.png", bbox=[100.0, 100.0, 10.0, 10.0]),
        _record("nan.png", bbox=[float("nan"), 10.0, 5.0, 5.0]),
        _record("two_points.png", segmentation=[[10.0, 10.0, 30.0, 30.0]]),
        _record("flat.png", segmentation=[[10.0, 10.0, 20.0, 10.0, 30.0, 10.0]]),
        _record(
            "one_bad_polygon.png",
            segmentation=[[10.0, 10.0, 30.0, 10.0, 30.0, 30.0], [1.0, 2.0]],
        ),
    ]
    with caplog.at_level(logging.WARNING):
        checked = _check(records)
    kept = {r["file_name"]: len(r["annotations"]) for r in checked}
    assert kept["good.png"] == 1 and kept["one_bad_polygon.png"] == 1
    for name in ("zero_width.png", "outside.png", "nan.png", "two_points.png", "flat.png"):
        assert kept[name] == 0, name
    assert len(checked[-1]["annotations"][0]["segmentation"]) == 1
    text = caplog.text
    assert "Dropped 3 annotation(s) of 'test' whose box has zero or negative size" in text
    assert "zero_width.png" in text
    assert "Dropped 3 polygon(s) of 'test' with fewer than 3 points or zero area" in text
    assert "Dropped 2 annotation(s) of 'test' without a valid polygon" in text


def test_keypoints_outside_the_image_are_marked_unlabelled_with_a_warning(caplog):
    records = [_record(f"{i}.png") for i in range(3)]
    records[0]["annotations"][0]["keypoints"][0:3] = [70.0, 10.0, 2]  # x beyond width 64
    records[1]["annotations"][0]["keypoints"][3:6] = [20.0, -3.0, 1]
    records[2]["annotations"][0]["keypoints"][6:9] = [200.0, 200.0, 0]  # unlabelled: fine
    with caplog.at_level(logging.WARNING):
        checked = _check(records)
    assert checked[0]["annotations"][0]["keypoints"][2] == 0
    assert checked[1]["annotations"][0]["keypoints"][5] == 0
    assert checked[2]["annotations"][0]["keypoints"][2::3] == [2, 2, 0, 2]
    assert "Marked 2 labelled keypoint(s) of 'test' that lie outside their image" in caplog.text
    assert "0.png, annotation 0: keypoint 0 at (70, 10)" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"bbox_mode": BoxMode.XYXY_ABS},
            r"8 of the 8 annotations of 'test' are invalid.*bbox_mode",
        ),
        ({"category_id": 3}, r"category id outside 0\.\.2 \(MODEL\.ROI_HEADS\.NUM_CLASSES 3\)"),
        ({"segmentation": None}, r"8 without a valid polygon or RLE mask.*MODEL\.MASK_ON False"),
        ({"keypoints": [1.0, 2.0, 2]}, r"do not have 4 keypoints \(x, y, v: 12 values\)"),
    ],
)
def test_systematic_annotation_errors_are_refused(change, message):
    # As XYXY, [10, 10, 20, 20] would be valid: use boxes whose XYWH width is below x0.
    records = [_record(f"{i}.png", bbox=[30.0, 30.0, 5.0, 5.0]) for i in range(8)]
    for r in records:
        r["annotations"][0].update(change)
    with pytest.raises(DataInputError, match=message):
        _check(records)


def test_keypoints_mostly_outside_are_refused():
    records = [_record(f"{i}.png") for i in range(4)]
    for r in records:  # in another scale: every keypoint x 4
        r["annotations"][0]["keypoints"] = [
            v * 4 if i % 3 != 2 else v for i, v in enumerate(r["annotations"][0]["keypoints"])
        ]
    with pytest.raises(DataInputError, match=r"16 labelled keypoints .* lie outside"):
        _check(records)


def test_too_elongated_image_is_refused():
    with pytest.raises(DataInputError, match=r"500 x 1\).*INPUT\.MAX_SIZE_TRAIN 64"):
        _check([_record("line.png", width=500, height=1)], max_size=64)


def _mapper() -> CheckedDatasetMapper:
    return CheckedDatasetMapper(load_config(str(TINY_CONFIG)), True)


def _save(path: Path, pixels: np.ndarray, mode: str | None = None) -> str:
    Image.fromarray(pixels, mode=mode).save(path)
    return str(path)


def test_grayscale_and_tiny_images_are_read_as_colour_and_scaled_up(tmp_path):
    mapper = _mapper()
    gray = _save(tmp_path / "gray.png", np.full((48, 64), 120, np.uint8))
    out = mapper(_record(gray))
    assert out["image"].shape == (3, 48, 64)  # 3 channels, the short side resized to 48..64
    assert torch.all(out["image"] == 120)
    tiny = _save(tmp_path / "tiny.png", np.full((3, 3, 3), 90, np.uint8))
    out = mapper(
        _record(
            tiny,
            width=3,
            height=3,
            bbox=[0.0, 0.0, 3.0, 3.0],
            segmentation=[[0.0, 0.0, 3.0, 0.0, 3.0, 3.0, 0.0, 3.0]],
            keypoints=[1.5, 0.5, 2, 1.5, 2.5, 2, 0.5, 1.5, 2, 2.5, 1.5, 2],
        )
    )
    assert out["image"].shape == (3, 64, 64)
    model = Trainer.build_model(load_config(str(TINY_CONFIG)))
    with EventStorage():
        losses = model([out])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"Image .*missing\.png does not exist"),
        ("not an image", r"Image .*bad\.png cannot be read .*not an image or is truncated"),
        ("16-bit", r"pixel mode 'I;16' \(16-bit or floating point\).*Convert it to 8-bit"),
        ("elongated", r"cannot be resized .* a side would become 0 pixels"),
        ("size mismatch", r"Mismatched image shape.*fix width/height in the annotations"),
    ],
)
def test_unusable_images_are_named(tmp_path, kind, message):
    path = tmp_path / ("missing.png" if kind == "missing" else "bad.png")
    width, height = 64, 48
    if kind == "not an image":
        path.write_text("not an image")
    elif kind == "16-bit":
        _save(path, np.full((48, 64), 3000, np.uint16))  # PIL mode I;16
    elif kind == "elongated":
        width, height = 500, 1
        _save(path, np.zeros((1, 500, 3), np.uint8))
    elif kind == "size mismatch":
        _save(path, np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DataInputError, match=message):
        _mapper()(_record(str(path), width=width, height=height))


def test_data_loader_worker_errors_read_like_the_original():
    wrapped = DataInputError(
        "Caught DataInputError in DataLoader worker process 0.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1, in f\n'
        "nl_detectron.data.checks.DataInputError: Image a.png cannot be read.\n"
    )
    assert str(wrapped) == "Image a.png cannot be read."


def test_no_trainable_image_is_refused(tmp_path):
    name = "nl_test_only_crowd"
    image = _save(tmp_path / "a.png", np.zeros((48, 64, 3), np.uint8))
    DatasetCatalog.register(name, lambda: [_record(image, iscrowd=1)])
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    try:
        cfg = load_config(str(TINY_CONFIG), ["DATASETS.TRAIN", f"('{name}',)"])
        with pytest.raises(DataInputError, match=rf"No image of '{name}'.*can be trained on"):
            Trainer.build_train_loader(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
