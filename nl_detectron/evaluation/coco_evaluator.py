"""detectron2's ``COCOEvaluator`` with the fastest correct COCO API installed."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

from detectron2.evaluation import COCOEvaluator
from detectron2.utils.file_io import PathManager

from .coco_backend import evaluate_predictions_on_coco, get_coco_backend

__all__ = ["FastCOCOEvaluator"]


class FastCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` (bbox, segm and keypoint AP) whose COCO API is chosen by
    :func:`~nl_detectron.evaluation.coco_backend.get_coco_backend`: detectron2's C++
    ``COCOeval_opt`` when detectron2 has its compiled extension, else ``faster-coco-eval``,
    else pycocotools. All report the same numbers as pycocotools.

    detectron2 v0.6 picks the ``COCOeval`` class inside ``_evaluate_predictions_on_coco``, which
    ``_eval_predictions`` calls, and loads the ground truth with pycocotools' ``COCO``. So this
    class re-indexes the ground truth with the backend's ``COCO`` class and overrides
    ``_eval_predictions``; everything else (collecting predictions, proposals, result tables)
    is detectron2's.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] | None = None,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        max_dets_per_image: int | None = None,
        use_fast_impl: bool = True,
        kpt_oks_sigmas: Sequence[float] = (),
        backend: str | None = None,
    ) -> None:
        """
        Args:
            dataset_name, tasks, distributed, output_dir, max_dets_per_image, kpt_oks_sigmas:
                as for detectron2's ``COCOEvaluator``.
            use_fast_impl: False forces the official pycocotools implementation.
            backend: ``"detectron2"``, ``"faster_coco_eval"`` or ``"pycocotools"``; None picks
                the fastest available (pycocotools if ``use_fast_impl`` is False).
        """
        super().__init__(
            dataset_name,
            tasks,
            distributed,
            output_dir,
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=use_fast_impl,
            kpt_oks_sigmas=kpt_oks_sigmas,
        )
        if backend is None and not use_fast_impl:
            backend = "pycocotools"
        self._backend = get_coco_backend(backend)
        self._use_fast_impl = self._backend.name != "pycocotools"
        if not isinstance(self._coco_api, self._backend.coco_cls):
            self._coco_api = self._backend.load_coco(self._coco_api.dataset)

    @property
    def backend_name(self) -> str:
        """The COCO API in use: ``"detectron2"``, ``"faster_coco_eval"`` or ``"pycocotools"``."""
        return self._backend.name

    def _eval_predictions(self, predictions: list[dict], img_ids: list[int] | None = None) -> None:
        """Fill ``self._results`` with the metrics of each task (as detectron2 v0.6 does)."""
        self._logger.info("Preparing results for COCO format ...")
        coco_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(coco_results)

        # Map contiguous class indices back to the dataset's category ids.
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            id_map = self._metadata.thing_dataset_id_to_contiguous_id
            reverse_id_map = {v: k for k, v in id_map.items()}
            for result in coco_results:
                if result["category_id"] not in reverse_id_map:
                    raise ValueError(
                        f"A prediction has class {result['category_id']}, but the dataset has "
                        f"{len(id_map)} classes (0 to {len(id_map) - 1}). Set "
                        f"MODEL.ROI_HEADS.NUM_CLASSES to {len(id_map)}."
                    )
                result["category_id"] = reverse_id_map[result["category_id"]]

        if self._output_dir:
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {file_path}")
            with PathManager.open(file_path, "w") as f:
                f.write(json.dumps(coco_results))

        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return

        self._logger.info(f"Evaluating predictions with the {self._backend.name} COCO API ...")
        for task in sorted(tasks):
            if task not in ("bbox", "segm", "keypoints"):
                raise ValueError(f"Unknown task {task!r}; valid: 'bbox', 'segm', 'keypoints'.")
            coco_eval = (
                evaluate_predictions_on_coco(
                    self._coco_api,
                    coco_results,
                    task,
                    backend=self._backend,
                    kpt_oks_sigmas=self._kpt_oks_sigmas,
                    img_ids=img_ids,
                    max_dets_per_image=self._max_dets_per_image,
                )
                if coco_results
                else None  # the COCO API does not handle empty results
            )
            self._results[task] = self._derive_coco_results(
                coco_eval, task, class_names=self._metadata.get("thing_classes")
            )
