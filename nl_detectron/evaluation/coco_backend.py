"""Which COCO API computes AP: the fastest correct one installed.

Three implementations of the official COCO metrics, in order of preference:

- ``"detectron2"``: detectron2's ``COCOeval_opt`` (C++ per-image matching and accumulation).
  Needs detectron2's compiled extension; a pure-Python build of detectron2 lacks it.
- ``"faster_coco_eval"``: the ``faster-coco-eval`` package, the same C++ algorithm, with its own
  ``COCO`` class (its keypoint evaluation reads an index pycocotools' ``COCO`` lacks).
- ``"pycocotools"``: the official Python ``COCOeval``, the reference for the numbers.

All three fill ``stats`` and ``eval["precision"]`` identically (tested against pycocotools).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compat import HAS_CPP_EXTENSION

__all__ = [
    "COCO_BACKENDS",
    "COCOBackend",
    "available_coco_backends",
    "evaluate_predictions_on_coco",
    "get_coco_backend",
]

logger = logging.getLogger(__name__)

COCO_BACKENDS = ("detectron2", "faster_coco_eval", "pycocotools")


@dataclass(frozen=True)
class COCOBackend:
    """One implementation of the COCO API.

    Attributes:
        name: one of :data:`COCO_BACKENDS`.
        coco_cls: its ground-truth / results API class (``COCO``).
        cocoeval_cls: its ``COCOeval`` class.
    """

    name: str
    coco_cls: type
    cocoeval_cls: type

    def load_coco(self, annotations: str | dict) -> Any:
        """The ground-truth API for a COCO json file or an already loaded COCO dict."""
        if isinstance(annotations, dict):
            coco = self.coco_cls()
            coco.dataset = annotations
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            return coco
        with contextlib.redirect_stdout(io.StringIO()):
            return self.coco_cls(annotations)

    def make_cocoeval(self, coco_gt: Any, coco_dt: Any, iou_type: str, max_dets: int) -> Any:
        """A ``COCOeval`` of this backend for ``iou_type``, summarising AP at ``max_dets``."""
        if self.name == "faster_coco_eval":
            # Its summary follows params.maxDets[-1]; its messages go to our logger.
            coco_eval = self.cocoeval_cls(coco_gt, coco_dt, iou_type, print_function=logger.info)
            # For keypoints it would keep only the categories that have annotations; pycocotools
            # (and detectron2's per-category table) use every category.
            coco_eval.params.catIds = sorted(coco_gt.getCatIds())
            return coco_eval
        if max_dets != 100 and iou_type != "keypoints":
            # pycocotools' summary hard-codes maxDets=100; detectron2's subclass follows maxDets.
            from detectron2.evaluation.coco_evaluation import COCOevalMaxDets

            return COCOevalMaxDets(coco_gt, coco_dt, iou_type)
        return self.cocoeval_cls(coco_gt, coco_dt, iou_type)


def available_coco_backends() -> list[str]:
    """The installed backends, fastest first."""
    available = []
    if HAS_CPP_EXTENSION:
        available.append("detectron2")
    if importlib.util.find_spec("faster_coco_eval") is not None:
        available.append("faster_coco_eval")
    if importlib.util.find_spec("pycocotools") is not None:
        available.append("pycocotools")
    return available


def get_coco_backend(name: str | None = None) -> COCOBackend:
    """The backend called ``name``, or the fastest available one when ``name`` is None."""
    available = available_coco_backends()
    if name is None:
        if not available:
            raise ImportError(
                "No COCO API is installed. Install one: pip install faster-coco-eval pycocotools"
            )
        name = available[0]
    if name not in COCO_BACKENDS:
        raise ValueError(f"Unknown COCO backend {name!r}; valid backends are {COCO_BACKENDS}.")
    if name not in available:
        fixes = {
            "detectron2": "install the official Detectron2 from source (it builds the extension)",
            "faster_coco_eval": "pip install faster-coco-eval",
            "pycocotools": "pip install pycocotools",
        }
        raise ImportError(
            f"COCO backend {name!r} is not available here (available: {available}); "
            f"to use it, {fixes[name]}."
        )
    if name == "detectron2":
        from detectron2.evaluation.fast_eval_api import COCOeval_opt
        from pycocotools.coco import COCO

        return COCOBackend(name, COCO, COCOeval_opt)
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCOBackend(name, COCO, COCOeval_faster)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCOBackend(name, COCO, COCOeval)


def evaluate_predictions_on_coco(
    coco_gt: Any,
    coco_results: Sequence[dict],
    iou_type: str,
    *,
    backend: COCOBackend,
    kpt_oks_sigmas: Sequence[float] = (),
    img_ids: Sequence[int] | None = None,
    max_dets_per_image: Sequence[int] | None = None,
) -> Any:
    """Evaluate COCO-format results; returns the summarised ``COCOeval``.

    Follows detectron2's ``_evaluate_predictions_on_coco`` (v0.6) with the evaluator class of
    ``backend``.

    Args:
        coco_gt: ground truth, an instance of ``backend.coco_cls``.
        coco_results: COCO-format results (``image_id``, ``category_id``, ``score`` and ``bbox`` /
            ``segmentation`` / ``keypoints``); not modified.
        iou_type: ``"bbox"``, ``"segm"`` or ``"keypoints"``.
        backend: from :func:`get_coco_backend`.
        kpt_oks_sigmas: per-keypoint OKS sigmas; empty for COCO's 17 person keypoints.
        img_ids: evaluate only these images; None for all.
        max_dets_per_image: the ``maxDets`` list (at least 3 values); None for ``[1, 10, 100]``.
    """
    if iou_type not in ("bbox", "segm", "keypoints"):
        raise ValueError(f"Unknown iou_type {iou_type!r}; valid: 'bbox', 'segm', 'keypoints'.")
    if len(coco_results) == 0:
        raise ValueError("evaluate_predictions_on_coco needs at least one result.")
    if not isinstance(coco_gt, backend.coco_cls):
        raise TypeError(
            f"coco_gt is a {type(coco_gt).__module__}.{type(coco_gt).__name__}, but backend "
            f"{backend.name!r} needs its own COCO class; load it with backend.load_coco(...)."
        )
    max_dets = list(max_dets_per_image) if max_dets_per_image is not None else [1, 10, 100]
    if len(max_dets) < 3:
        raise ValueError(f"max_dets_per_image needs at least 3 values, got {max_dets}.")

    coco_results = copy.deepcopy(list(coco_results))  # loadRes adds fields to the dicts
    if iou_type == "segm":
        # With a bbox, the COCO API would take the box area as the instance area (for the
        # small / medium / large split); without it, the mask area is used.
        for result in coco_results:
            result.pop("bbox", None)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(coco_results)
    coco_eval = backend.make_cocoeval(coco_gt, coco_dt, iou_type, max_dets[2])
    if iou_type != "keypoints":
        coco_eval.params.maxDets = max_dets
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)

    if iou_type == "keypoints":
        if kpt_oks_sigmas:
            coco_eval.params.kpt_oks_sigmas = np.array(kpt_oks_sigmas, dtype=np.float64)
        num_dt = len(coco_results[0]["keypoints"]) // 3
        num_gt = len(next(iter(coco_gt.anns.values()))["keypoints"]) // 3
        num_sigmas = len(coco_eval.params.kpt_oks_sigmas)
        if not num_dt == num_gt == num_sigmas:
            raise ValueError(
                f"Keypoint evaluation needs one OKS sigma per keypoint: the predictions have "
                f"{num_dt} keypoints, the ground truth {num_gt}, and there are {num_sigmas} sigmas "
                f"(cfg.TEST.KEYPOINT_OKS_SIGMAS; empty means COCO's 17). Set "
                f"TEST.KEYPOINT_OKS_SIGMAS to {num_gt} values."
            )

    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval
