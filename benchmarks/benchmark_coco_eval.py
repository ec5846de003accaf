"""Speed and agreement of the COCO evaluation backends on a large generated COCO-like set.

Generates, deterministically and in memory, a COCO-format ground truth (``--images`` images,
about ``--objects`` instances each over 80 categories, 30% of them "person" with 17 keypoints;
polygon masks, and 1% crowd regions with RLE masks; and, like COCO's ``person_keypoints`` file,
the person instances alone for keypoint evaluation) and two result sets like a detector's: an
instance-segmentation model's (``--dets`` detections per image with boxes and RLE masks: noisy
copies of the ground truth, duplicates and false positives) and a keypoint model's (the person
detections of that set, with keypoints). Then evaluates bbox and segm on the first and keypoints
on the second with the backend nl_detectron picks (``nl_detectron.evaluation.get_coco_backend()``:
detectron2's C++ COCOeval, else faster-coco-eval, else pycocotools) and with pycocotools, through
``nl_detectron.evaluation.evaluate_predictions_on_coco`` as ``FastCOCOEvaluator`` does, and prints
both ``stats`` arrays, their largest absolute difference and the times.

    python benchmarks/benchmark_coco_eval.py            # 5000 images, 100 detections each
    python benchmarks/benchmark_coco_eval.py --quick    # 50 images, 20 detections each

Times: ground-truth indexing (``COCO`` from the loaded dict) once per backend, then for each
task the whole ``evaluate_predictions_on_coco`` call (copying the results, ``loadRes``,
``evaluate``, ``accumulate``, ``summarize``), the chosen backend first, then pycocotools.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name, load_average  # noqa: E402

from nl_detectron.evaluation import (  # noqa: E402
    evaluate_predictions_on_coco,
    get_coco_backend,
)

NUM_CATEGORIES = 80
PERSON = 1  # category id of the category with keypoints
NUM_KEYPOINTS = 17
PERSON_SHARE = 0.3  # of the instances (COCO train2017: about 30%)
CROWD_SHARE = 0.01
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375))
TASKS = ("bbox", "segm", "keypoints")


# ---------------------------------------------------------------------------------------------
# Generated data


def _ellipse(box: np.ndarray, rng: np.random.RandomState, vertices: int = 12) -> list[float]:
    """A jittered ellipse inscribed in ``box`` (x, y, w, h), as a flat COCO polygon."""
    x, y, w, h = box
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radius = rng.uniform(0.8, 1.0, vertices)
    xs = x + w / 2 * (1 + radius * np.cos(angles))
    ys = y + h / 2 * (1 + radius * np.sin(angles))
    return np.round(np.stack([xs, ys], axis=1).ravel(), 2).tolist()


def _polygon_area(polygon: list[float]) -> float:
    xy = np.asarray(polygon).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _random_boxes(n: int, width: int, height: int, rng: np.random.RandomState) -> np.ndarray:
    """``(n, 4)`` boxes (x, y, w, h) inside the image, sides log-uniform in 8..400 px."""
    sides = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2)))
    sides = np.minimum(sides, [width - 1, height - 1])
    corner = rng.uniform(0, 1, (n, 2)) * ([width, height] - sides)
    return np.round(np.concatenate([corner, sides], axis=1), 2)


def _keypoints_in(
    box: np.ndarray, rng: np.random.RandomState, visibility: np.ndarray
) -> np.ndarray:
    """``(17, 3)`` keypoints (x, y, v) inside ``box`` (x, y, w, h); x = y = 0 where v = 0."""
    x, y, w, h = box
    points = np.stack([x + rng.uniform(0, w, NUM_KEYPOINTS), y + rng.uniform(0, h, NUM_KEYPOINTS)])
    keypoints = np.concatenate([np.round(points.T, 2), visibility[:, None]], axis=1)
    keypoints[visibility == 0, :2] = 0
    return keypoints


def make_ground_truth(images: int, objects: float, seed: int) -> dict[str, Any]:
    """A COCO-format ground-truth dict."""
    rng = np.random.RandomState(seed)
    categories = [
        {"id": c, "name": f"category_{c}", "supercategory": "thing"}
        for c in range(1, NUM_CATEGORIES + 1)
    ]
    categories[0].update(
        name="person",
        keypoints=[f"keypoint_{k}" for k in range(NUM_KEYPOINTS)],
        skeleton=[[k, k + 1] for k in range(1, NUM_KEYPOINTS)],
    )
    image_list, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = IMAGE_SIZES[rng.randint(len(IMAGE_SIZES))]
        image_list.append(
            {"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"}
        )
        count = max(1, rng.poisson(objects))
        for box in _random_boxes(count, width, height, rng):
            is_person = rng.uniform() < PERSON_SHARE
            category = PERSON if is_person else int(rng.randint(2, NUM_CATEGORIES + 1))
            polygon = _ellipse(box, rng)
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": box.tolist(),
                "iscrowd": 0,
                "area": _polygon_area(polygon),
                "segmentation": [polygon],
            }
            if rng.uniform() < CROWD_SHARE:
                rle = mask_util.merge(mask_util.frPyObjects([polygon], height, width))
                rle["counts"] = rle["counts"].decode("ascii")
                ann.update(iscrowd=1, segmentation=rle, area=float(mask_util.area(rle)))
            if category == PERSON:
                visibility = rng.choice([0, 1, 2], NUM_KEYPOINTS, p=[0.3, 0.1, 0.6])
                if ann["iscrowd"]:
                    visibility[:] = 0
                ann["keypoints"] = _keypoints_in(box, rng, visibility).ravel().tolist()
                ann["num_keypoints"] = int((visibility > 0).sum())
            annotations.append(ann)
    return {
        "info": {"description": "generated COCO-like benchmark set"},
        "images": image_list,
        "annotations": annotations,
        "categories": categories,
    }


def keypoint_ground_truth(gt: dict[str, Any]) -> dict[str, Any]:
    """The person-keypoint ground truth of ``gt``: all images, the person category and its
    instances only, like COCO's ``person_keypoints_*.json``."""
    return {
        "info": gt["info"],
        "images": gt["images"],
        "annotations": [a for a in gt["annotations"] if a["category_id"] == PERSON],
        "categories": [c for c in gt["categories"] if c["id"] == PERSON],
    }


def make_results(
    gt: dict[str, Any], dets: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A detector's results for every image of ``gt``: instance (bbox + RLE mask) and keypoint.

    Per image: for every ground-truth instance a noisy copy (right category 90% of the time) and
    a looser duplicate, then random false positives up to ``dets`` detections. The keypoint set
    holds the person detections with keypoints near the ground truth's (random for false ones).
    """
    rng = np.random.RandomState(seed + 1)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    instances, keypoints = [], []
    for image in gt["images"]:
        image_id, width, height = image["id"], image["width"], image["height"]
        gts = by_image.get(image_id, [])[: dets // 2]
        boxes, categories, scores, sources = [], [], [], []
        for ann, noise, score in ((a, 0.05, (0.3, 1.0)) for a in gts):
            for scale in (noise, 4 * noise):  # the copy, then the looser duplicate
                box = np.asarray(ann["bbox"])
                jitter = rng.normal(0, scale, 4) * box[[2, 3, 2, 3]]
                box = box + jitter
                box[2:] = np.maximum(box[2:], 1)
                boxes.append(box)
                right = rng.uniform() < 0.9
                categories.append(
                    ann["category_id"] if right else int(rng.randint(1, NUM_CATEGORIES + 1))
                )
                scores.append(rng.uniform(*score) * (1 if scale == noise else 0.5))
                sources.append(ann)
        false = dets - len(boxes)
        boxes.extend(_random_boxes(false, width, height, rng))
        false_categories = np.where(
            rng.uniform(size=false) < PERSON_SHARE,
            PERSON,
            rng.randint(2, NUM_CATEGORIES + 1, false),
        )
        categories.extend(int(c) for c in false_categories)
        scores.extend(rng.uniform(0.0, 0.6, false))
        sources.extend([None] * false)
        polygons = [_ellipse(np.round(b, 2), rng) for b in boxes]
        rles = mask_util.frPyObjects(polygons, height, width)
        for box, category, score, source, rle in zip(boxes, categories, scores, sources, rles):
            rle["counts"] = rle["counts"].decode("ascii")  # as detectron2 writes them
            result = {
                "image_id": image_id,
                "category_id": category,
                "bbox": np.round(box, 2).tolist(),
                "score": round(float(score), 5),
                "segmentation": rle,
            }
            instances.append(result)
            if category != PERSON:
                continue
            if source is not None and "keypoints" in source:
                points = np.asarray(source["keypoints"], dtype=np.float64).reshape(-1, 3)
                points[:, :2] += rng.normal(0, 0.05, (NUM_KEYPOINTS, 2)) * box[2:]
            else:
                points = _keypoints_in(box, rng, np.ones(NUM_KEYPOINTS))
            points[:, 2] = rng.uniform(0, 1, NUM_KEYPOINTS)  # keypoint scores
            keypoints.append(
                {
                    "image_id": image_id,
                    "category_id": PERSON,
                    "bbox": result["bbox"],
                    "score": result["score"],
                    "keypoints": np.round(points, 2).ravel().tolist(),
                }
            )
    return instances, keypoints


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    backend_name: str | None,
    results: dict[str, list[dict[str, Any]]],
    task: str,
    coco_gt: Any,
) -> tuple[np.ndarray, float]:
    """``stats`` of one task with one backend, and the seconds the evaluation took."""
    backend = get_coco_backend(backend_name)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the APIs' progress and summary tables
        coco_eval = evaluate_predictions_on_coco(coco_gt, results[task], task, backend=backend)
    return np.asarray(coco_eval.stats, dtype=np.float64), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--objects", type=float, default=7.0, help="mean instances per image")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="50 images, 20 detections each")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |diff|")
    args = parser.parse_args()
    if args.quick:
        args.images, args.dets = 50, 20

    fast = get_coco_backend()
    reference = get_coco_backend("pycocotools")
    print(
        f"# COCO evaluation benchmark, {datetime.date.today()}: {cpu_name()}, "
        f"{os.cpu_count()} CPUs, load average {load_average()}; backend chosen by nl_detectron: "
        f"{fast.name}; reference: pycocotools",
        flush=True,
    )
    start = time.perf_counter()
    gt = make_ground_truth(args.images, args.objects, args.seed)
    instances, keypoints = make_results(gt, args.dets, args.seed)
    results = {"bbox": instances, "segm": instances, "keypoints": keypoints}
    print(
        f"generated in {time.perf_counter() - start:.1f} s: {len(gt['images'])} images, "
        f"{len(gt['annotations'])} ground-truth instances "
        f"({sum(a['category_id'] == PERSON for a in gt['annotations'])} persons, "
        f"{sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(instances)} instance "
        f"results, {len(keypoints)} keypoint results",
        flush=True,
    )

    backends = [fast.name, reference.name]
    datasets = {"instances": gt, "person_keypoints": keypoint_ground_truth(gt)}
    index_s = {name: 0.0 for name in backends}
    coco_gt: dict[tuple[str, str], Any] = {}
    for name in backends:
        for dataset, dataset_dict in datasets.items():
            begin = time.perf_counter()
            coco_gt[name, dataset] = get_coco_backend(name).load_coco(dataset_dict)
            index_s[name] += time.perf_counter() - begin

    rows = []
    worst = 0.0
    for task in TASKS:
        stats, seconds = {}, {}
        for name in backends:
            dataset = "person_keypoints" if task == "keypoints" else "instances"
            stats[name], seconds[name] = evaluate(name, results, task, coco_gt[name, dataset])
        diff = float(np.max(np.abs(stats[fast.name] - stats[reference.name])))
        worst = max(worst, diff)
        for name in backends:
            print(f"{task} {name:>16} stats: {np.array2string(stats[name], precision=6)}")
        print(f"{task} max |diff| {diff:.2e}", flush=True)
        rows.append({"task": task, "seconds": seconds, "max_abs_diff": diff})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n## COCO evaluation: {fast.name} vs pycocotools\n")
    print(f"| task | {fast.name} (s) | pycocotools (s) | speedup | max abs diff of stats |")
    print("|---|---|---|---|---|")
    print(
        f"| index ground truth | {index_s[fast.name]:.2f} | {index_s[reference.name]:.2f} | "
        f"{index_s[reference.name] / index_s[fast.name]:.2f}x | — |"
    )
    for row in rows:
        s = row["seconds"]
        print(
            f"| {row['task']} | {s[fast.name]:.2f} | {s[reference.name]:.2f} | "
            f"{s[reference.name] / s[fast.name]:.2f}x | {row['max_abs_diff']:.1e} |"
        )
    total = {name: index_s[name] + sum(r["seconds"][name] for r in rows) for name in backends}
    print(
        f"| total | {total[fast.name]:.2f} | {total[reference.name]:.2f} | "
        f"{total[reference.name] / total[fast.name]:.2f}x | {worst:.1e} |"
    )
    print(f"\nload average at the end: {load_average()}")
    if worst > args.tolerance:
        sys.exit(f"stats differ by {worst:.2e} > {args.tolerance:.0e}")


if __name__ == "__main__":
    main()
