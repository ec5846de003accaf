"""COCO evaluation: every backend reports pycocotools' numbers, and AP measures predictions."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

from nl_detectron.compat import HAS_CPP_EXTENSION
from nl_detectron.data import SHAPES_KEYPOINT_OKS_SIGMAS, SHAPES_SPLITS, ensure_shapes_split
from nl_detectron.evaluation import (
    FastCOCOEvaluator,
    available_coco_backends,
    evaluate_predictions_on_coco,
    get_coco_backend,
)

FAST_BACKENDS = [b for b in available_coco_backends() if b != "pycocotools"]
SIGMAS = list(SHAPES_KEYPOINT_OKS_SIGMAS)
SPLIT = replace(SHAPES_SPLITS[1], name="nl_shapes_eval_test", num_images=30)


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """A small generated set: (json path, COCO dict)."""
    directory = ensure_shapes_split(SPLIT, tmp_path_factory.mktemp("shapes"))
    path = directory / "annotations.json"
    with open(path, encoding="utf-8") as f:
        return str(path), json.load(f)


@pytest.fixture(scope="module")
def dataset(gt):
    """``gt`` registered as a detectron2 dataset, for the evaluator."""
    path, coco = gt
    MetadataCatalog.get(SPLIT.name).set(
        json_file=path,
        thing_classes=[c["name"] for c in coco["categories"]],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(coco["categories"])},
    )
    yield SPLIT.name
    MetadataCatalog.remove(SPLIT.name)


def _rle(polygon: np.ndarray, height: int, width: int) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects([polygon.reshape(-1).tolist()], height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _noisy_results(coco: dict, seed: int = 0) -> list[dict]:
    """COCO results with every kind of error: shifted and rescaled boxes, masks and keypoints,
    wrong classes, duplicates, missed objects and false positives, random scores."""
    rng = np.random.default_rng(seed)
    images = {im["id"]: im for im in coco["images"]}
    results = []
    for ann in coco["annotations"]:
        if rng.uniform() < 0.1:
            continue  # missed
        image = images[ann["image_id"]]
        for _ in range(int(rng.integers(1, 3))):  # sometimes a duplicate
            shift = rng.normal(0.0, 2.5, size=2)
            scale = rng.uniform(0.85, 1.15)
            polygon = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            center = polygon.mean(axis=0)
            polygon = (polygon - center) * scale + center + shift
            x, y, w, h = ann["bbox"]
            keypoints = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
            keypoints[:, :2] = (keypoints[:, :2] - center) * scale + center + shift
            keypoints[:, :2] += rng.normal(0.0, 1.0, size=(len(keypoints), 2))
            category = ann["category_id"]
            if rng.uniform() < 0.15:
                category = int(rng.integers(1, 4))
            results.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": category,
                    "score": float(rng.uniform(0.05, 1.0)),
                    "bbox": [x + shift[0], y + shift[1], w * scale, h * scale],
                    "segmentation": _rle(polygon, image["height"], image["width"]),
                    "keypoints": keypoints.reshape(-1).tolist(),
                }
            )
    for image in coco["images"][::3]:  # false positives
        x, y = rng.uniform(0, 100, size=2)
        w, h = rng.uniform(10, 40, size=2)
        polygon = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
        keypoints = np.stack([rng.uniform(x, x + w, 4), rng.uniform(y, y + h, 4), np.ones(4)], 1)
        results.append(
            {
                "image_id": image["id"],
                "category_id": int(rng.integers(1, 4)),
                "score": float(rng.uniform(0.05, 1.0)),
                "bbox": [x, y, w, h],
                "segmentation": _rle(polygon, image["height"], image["width"]),
                "keypoints": keypoints.reshape(-1).tolist(),
            }
        )
    return results


def _stats(backend_name: str, path: str, results: list[dict], iou_type: str, **kwargs):
    backend = get_coco_backend(backend_name)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = evaluate_predictions_on_coco(
            backend.load_coco(path), results, iou_type, backend=backend, **kwargs
        )
    return np.asarray(coco_eval.stats, dtype=float), np.asarray(coco_eval.eval["precision"])


def test_backend_preference():
    available = available_coco_backends()
    assert "pycocotools" in available
    assert get_coco_backend().name == available[0]
    if HAS_CPP_EXTENSION:  # Detectron2 built from source: its own C++ COCOeval
        assert get_coco_backend().name == "detectron2"
    else:  # the registry build: the same C++ algorithm from faster-coco-eval
        assert "detectron2" not in available
        assert get_coco_backend().name == "faster_coco_eval"
    with pytest.raises(ValueError, match="valid backends"):
        get_coco_backend("cocoapi")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("iou_type, num_stats", [("bbox", 12), ("segm", 12), ("keypoints", 10)])
def test_fast_backend_matches_pycocotools(gt, backend, iou_type, num_stats):
    path, coco = gt
    results = _noisy_results(coco)
    kwargs = {"kpt_oks_sigmas": SIGMAS} if iou_type == "keypoints" else {}
    reference, ref_precision = _stats("pycocotools", path, results, iou_type, **kwargs)
    stats, precision = _stats(backend, path, results, iou_type, **kwargs)
    assert len(reference) == num_stats
    # Not a degenerate comparison: AP well inside (0, 1).
    assert 0.03 < reference[0] < 0.95 and 0.1 < reference[1] < 0.99
    np.testing.assert_allclose(stats[:num_stats], reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(precision, ref_precision, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backend_matches_pycocotools_with_custom_max_dets(gt, backend):
    path, coco = gt
    results = _noisy_results(coco, seed=1)
    reference, _ = _stats("pycocotools", path, results, "bbox", max_dets_per_image=[1, 2, 3])
    stats, _ = _stats(backend, path, results, "bbox", max_dets_per_image=[1, 2, 3])
    np.testing.assert_allclose(stats[:12], reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_perfect_predictions_score_100_and_shifted_ones_less(gt, iou_type):
    path, coco = gt
    perfect = []
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        polygon = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        perfect.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "score": 0.9,
                "bbox": list(ann["bbox"]),
                "segmentation": _rle(polygon, image["height"], image["width"]),
                "keypoints": list(ann["keypoints"]),
            }
        )
    kwargs = {"kpt_oks_sigmas": SIGMAS} if iou_type == "keypoints" else {}
    for backend in available_coco_backends():
        stats, _ = _stats(backend, path, perfect, iou_type, **kwargs)
        assert stats[0] == pytest.approx(1.0), backend  # AP
        assert stats[1] == pytest.approx(1.0), backend  # AP50

    shifted = []
    for result in perfect:
        result = dict(result)
        x, y, w, h = result["bbox"]
        dx = 0.25 * w
        image = images[result["image_id"]]
        polygon = np.asarray(
            next(
                a
                for a in coco["annotations"]
                if a["image_id"] == result["image_id"] and a["bbox"] == [x, y, w, h]
            )["segmentation"][0]
        ).reshape(-1, 2)
        result["bbox"] = [x + dx, y, w, h]
        result["segmentation"] = _rle(polygon + [dx, 0.0], image["height"], image["width"])
        keypoints = np.asarray(result["keypoints"], dtype=float).reshape(-1, 3)
        keypoints[:, 0] += dx
        result["keypoints"] = keypoints.reshape(-1).tolist()
        shifted.append(result)
    for backend in available_coco_backends():
        stats, _ = _stats(backend, path, shifted, iou_type, **kwargs)
        assert 0.0 <= stats[0] < 0.9, backend


def _instances(coco: dict, image_id: int, *, shift: float = 0.0) -> Instances:
    """Ground truth of one image as a model's output (contiguous classes, XYXY boxes)."""
    image = next(im for im in coco["images"] if im["id"] == image_id)
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
    height, width = image["height"], image["width"]
    boxes, masks, keypoints = [], [], []
    for ann in anns:
        x, y, w, h = ann["bbox"]
        boxes.append([x + shift, y, x + w + shift, y + h])
        polygon = np.asarray(ann["segmentation"][0]).reshape(-1, 2) + [shift, 0.0]
        rle = mask_util.frPyObjects([polygon.reshape(-1).tolist()], height, width)
        masks.append(mask_util.decode(mask_util.merge(rle)).astype(bool))
        kp = np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3)
        kp[:, 0] += shift
        kp[:, :2] += 0.5  # the model's coordinates; the evaluator subtracts 0.5 for COCO
        keypoints.append(kp)
    instances = Instances((height, width))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.full((len(anns),), 0.9)
    instances.pred_classes = torch.tensor([a["category_id"] - 1 for a in anns])
    instances.pred_masks = torch.from_numpy(np.stack(masks))
    instances.pred_keypoints = torch.from_numpy(np.stack(keypoints))
    return instances


def _evaluate(dataset: str, coco: dict, backend: str, shift: float, tmp_path) -> dict:
    evaluator = FastCOCOEvaluator(
        dataset,
        distributed=False,
        output_dir=str(tmp_path / backend),
        kpt_oks_sigmas=SIGMAS,
        backend=backend,
    )
    assert evaluator.backend_name == backend
    evaluator.reset()
    for image in coco["images"]:
        inputs = [{"image_id": image["id"]}]
        outputs = [{"instances": _instances(coco, image["id"], shift=shift)}]
        evaluator.process(inputs, outputs)
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()


def test_evaluator_reports_the_same_with_every_backend(dataset, gt, tmp_path):
    _, coco = gt
    perfect = {b: _evaluate(dataset, coco, b, 0.0, tmp_path) for b in available_coco_backends()}
    shifted = {b: _evaluate(dataset, coco, b, 6.0, tmp_path) for b in available_coco_backends()}
    reference = perfect["pycocotools"]
    assert set(reference) == {"bbox", "segm", "keypoints"}  # tasks inferred from the outputs
    for task in ("bbox", "segm", "keypoints"):
        assert reference[task]["AP"] == pytest.approx(100.0)
        assert shifted["pycocotools"][task]["AP"] < 90.0
    for backend in FAST_BACKENDS:
        for results, expected in (
            (perfect[backend], reference),
            (shifted[backend], shifted["pycocotools"]),
        ):
            for task in expected:
                for metric, value in expected[task].items():
                    assert results[task][metric] == pytest.approx(value, abs=1e-4, nan_ok=True)


def test_evaluator_rejects_unknown_class(dataset, gt, tmp_path):
    _, coco = gt
    evaluator = FastCOCOEvaluator(dataset, distributed=False, kpt_oks_sigmas=SIGMAS)
    evaluator.reset()
    image = coco["images"][0]
    instances = _instances(coco, image["id"])
    instances.pred_classes = torch.full_like(instances.pred_classes, 7)
    evaluator.process([{"image_id": image["id"]}], [{"instances": instances}])
    with pytest.raises(ValueError, match="NUM_CLASSES to 3"):
        evaluator.evaluate()
