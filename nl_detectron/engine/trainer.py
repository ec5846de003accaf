"""The training loop of ``tools/train_net.py``: detectron2's ``DefaultTrainer`` with fast COCO
evaluation and a best-model checkpoint."""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm

from .. import data as _data  # noqa: F401  (registers the bundled datasets)
from ..checkpointer import NonLocalCheckpointer
from ..evaluation import FastCOCOEvaluator

__all__ = ["Trainer", "main_metric"]

logger = logging.getLogger(__name__)


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

    Checkpoints are loaded through :class:`~nl_detectron.checkpointer.NonLocalCheckpointer`
    (a report of the new NL parameters; resuming from another model's checkpoint refused) and
    hold the optimizer state, which detectron2 v0.6's ``DefaultTrainer`` leaves out, so that
    ``--resume`` restores model, optimizer, scheduler and iteration.

    Everything else is detectron2's: logging with ETA (``CommonMetricPrinter``), ``metrics.json``
    and TensorBoard events in ``OUTPUT_DIR``.
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
        # DefaultTrainer.__init__ creates a DetectionCheckpointer, then calls this method once;
        # replace it first, so that the checkpoint hooks and resume_or_load share ours.
        self.checkpointer = self.build_checkpointer()
        ret = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            best = hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, main_metric(self.cfg), mode="max"
            )
            index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            ret.insert(index + 1, best)
        return ret

    def build_checkpointer(self) -> NonLocalCheckpointer:
        """The run's checkpointer: the model and this trainer's state, in ``OUTPUT_DIR``."""
        return NonLocalCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    def state_dict(self) -> dict[str, Any]:
        """Iteration and hook states (the scheduler's), and the optimizer state."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning(
                "The checkpoint has no optimizer state (detectron2 v0.6's DefaultTrainer does not "
                "save it): resuming with the optimizer's momentum reset to zero."
            )
