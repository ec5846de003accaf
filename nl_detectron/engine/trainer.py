"""The training loop of ``tools/train_net.py``: detectron2's ``DefaultTrainer`` with fast COCO
evaluation and a best-model checkpoint."""

from __future__ import annotations

import os

from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm

from .. import data as _data  # noqa: F401  (registers the bundled datasets)
from ..evaluation import FastCOCOEvaluator

__all__ = ["Trainer", "main_metric"]


def main_metric(cfg: CfgNode) -> str:
    """The metric that picks the best model, as the evaluation stores it: ``segm/AP`` for Mask
    R-CNN, else ``keypoints/AP`` for Keypoint R-CNN, else ``bbox/AP`` (prefixed by the first
    test dataset's name when there are several)."""
    if cfg.MODEL.MASK_ON:
        task = "segm"
    elif cfg.MODEL.KEYPOINT_ON:
        task = "keypoints"
    else:
        task = "bbox"
    metric = f"{task}/AP"
    if len(cfg.DATASETS.TEST) > 1:
        metric = f"{cfg.DATASETS.TEST[0]}/{metric}"
    return metric


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with :class:`~nl_detectron.evaluation.FastCOCOEvaluator` and a
    ``BestCheckpointer`` that keeps ``model_best.pth`` (highest :func:`main_metric`).

    Everything else is detectron2's: checkpoints, logging with ETA (``CommonMetricPrinter``),
    ``metrics.json`` and TensorBoard events in ``OUTPUT_DIR``.
    """

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> FastCOCOEvaluator:
        """COCO AP of every task the model predicts (bbox, segm, keypoints), with the keypoint
        OKS sigmas of ``TEST.KEYPOINT_OKS_SIGMAS``."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return FastCOCOEvaluator(
            dataset_name,
            output_dir=output_folder,
            kpt_oks_sigmas=tuple(cfg.TEST.KEYPOINT_OKS_SIGMAS),
        )

    def build_hooks(self) -> list[hooks.HookBase]:
        """detectron2's hooks, with a ``BestCheckpointer`` right after the ``EvalHook``."""
        ret = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            best = hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, main_metric(self.cfg), mode="max"
            )
            index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            ret.insert(index + 1, best)
        return ret
