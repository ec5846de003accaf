"""The training loop of ``tools/train_net.py``: detectron2's ``DefaultTrainer`` with fast COCO
evaluation and a best-model checkpoint."""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from torch import nn

from .. import data as _data  # noqa: F401  (registers the bundled datasets)
from ..checkpoint import AtomicCheckpointer, BestCheckpointer
from ..compat import TRAINER_SAVES_TRAINER_STATE, ddp_on_any_device, restart_data_loader
from ..data.checks import CheckedDatasetMapper
from ..data.train_loader import ReseedEachIteration, ResumableTrainLoader, build_train_loader
from ..device import amp_dtype
from ..errors import UserInputError
from ..evaluation import FastCOCOEvaluator
from ..evaluation.metrics_file import main_metric_of
from ..layers import non_local_blocks
from .amp import amp_trainer_of_default_trainer
from .block_optimizer import ADAMW_KEY, SGDWithAdamWGroups
from .divergence import (
    TrainingDivergedError,
    diverged_message,
    parse_d2_message,
    user_errors_logged_without_traceback,
)
from .launch import ReplicaConsistencyCheck

__all__ = ["Trainer", "main_metric"]

logger = logging.getLogger(__name__)


def _parameters_of(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """The parameters of the modules ``names`` of ``model``; an unknown name is a
    :class:`UserInputError` that names it and the model's heads."""
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        heads = sorted(n for n in modules if n.count(".") == 1 and n.startswith("roi_heads."))
        raise UserInputError(
            f"MODEL.NONLOCAL.OPTIMIZE_WITH_BLOCKS names {unknown}, which this model does not "
            f"have: give module names as in model.named_modules(), e.g. {heads}."
        )
    return [p for name in names for p in modules[name].parameters()]


def main_metric(cfg: CfgNode) -> str:
    """The metric that picks the best model, as the evaluation stores it: ``segm/AP`` for Mask
    R-CNN, else ``keypoints/AP`` for Keypoint R-CNN, else ``bbox/AP`` (prefixed by the first
    test dataset's name when there are several)."""
    metric = main_metric_of(mask=cfg.MODEL.MASK_ON, keypoints=cfg.MODEL.KEYPOINT_ON)
    if len(cfg.DATASETS.TEST) > 1:
        metric = f"{cfg.DATASETS.TEST[0]}/{metric}"
    return metric


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with :class:`~nl_detectron.evaluation.FastCOCOEvaluator` and a
    ``BestCheckpointer`` that keeps ``model_best.pth`` (highest :func:`main_metric`).

    Checkpoints are loaded through :class:`~nl_detectron.checkpoint.NonLocalCheckpointer`
    (a report of the new NL parameters; resuming from another model's checkpoint refused) and
    hold the optimizer state (Detectron2 main saves it; v0.6's ``DefaultTrainer`` leaves it out
    and this class adds it), so that ``--resume`` restores model, optimizer, scheduler and
    iteration.

    Reliability (docs/reliability.md): checkpoints are written atomically
    (:class:`~nl_detectron.checkpoint.AtomicCheckpointer`); the training data is
    checked and its loader resumes where the checkpoint was
    (:mod:`~nl_detectron.data.train_loader`), so with ``SEED >= 0`` a resumed run continues
    exactly as the uninterrupted one; CPU models train in several processes (gloo); a NaN / inf
    loss stops the run with :class:`~nl_detectron.errors.TrainingDivergedError`. With
    ``SOLVER.AMP.ENABLED`` it trains in mixed precision, float16 or bfloat16
    (``SOLVER.AMP.PRECISION``; :class:`~nl_detectron.engine.amp.AMPTrainer`).

    Everything else is detectron2's: logging with ETA (``CommonMetricPrinter``), ``metrics.json``
    and TensorBoard events in ``OUTPUT_DIR``.
    """

    def __init__(self, cfg: CfgNode) -> None:
        # detectron2 wraps the model in DDP with device_ids=[rank], which CPU models reject, and
        # builds an AMPTrainer of fixed precision.
        precision = amp_dtype(cfg.SOLVER.AMP.PRECISION, "SOLVER.AMP.PRECISION")
        with ddp_on_any_device(), amp_trainer_of_default_trainer(precision):
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """detectron2's model; a bad ``MODEL.NONLOCAL`` setting is a :class:`UserInputError`."""
        try:
            return super().build_model(cfg)
        except ValueError as e:
            if "MODEL.NONLOCAL" not in str(e):
                raise
            raise UserInputError(str(e)) from None

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        """detectron2's optimizer; the NL blocks' parameters at ``MODEL.NONLOCAL.LR_FACTOR``
        times the learning rate of the others (each in its own parameter group, so the
        schedule scales both alike), updated by AdamW instead of SGD with
        ``MODEL.NONLOCAL.OPTIMIZER "AdamW"`` (:mod:`.block_optimizer`); so are the modules
        that ``MODEL.NONLOCAL.OPTIMIZE_WITH_BLOCKS`` names."""
        optimizer = super().build_optimizer(cfg, model)
        node = cfg.MODEL.get("NONLOCAL")
        factor = node.LR_FACTOR if node is not None else 1.0
        adamw = node is not None and node.get("OPTIMIZER", "SGD") == "AdamW"
        ids = {id(p) for _, block in non_local_blocks(model) for p in block.parameters()}
        with_blocks = node.get("OPTIMIZE_WITH_BLOCKS", []) if node is not None else []
        ids |= {id(p) for p in _parameters_of(model, with_blocks)}
        if not ids or (factor == 1.0 and not adamw):
            return optimizer
        groups, optimizer.param_groups = optimizer.param_groups, []
        for group in groups:
            non_local = [p for p in group["params"] if id(p) in ids]
            others = [p for p in group["params"] if id(p) not in ids]
            for params, lr in ((others, group["lr"]), (non_local, group["lr"] * factor)):
                if params:
                    mark = {ADAMW_KEY: True} if adamw and params is non_local else {}
                    optimizer.param_groups.append({**group, "params": params, "lr": lr, **mark})
        if not adamw:
            return optimizer
        solver = cfg.SOLVER
        return maybe_add_gradient_clipping(cfg, SGDWithAdamWGroups)(
            optimizer.param_groups,
            lr=solver.BASE_LR,
            momentum=solver.MOMENTUM,
            nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY,
        )

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> ResumableTrainLoader:
        """detectron2's training data, checked, reproducible and resumable
        (:func:`~nl_detectron.data.train_loader.build_train_loader`)."""
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """detectron2's test loader, with unusable images reported by name."""
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False)
        )

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
            best = BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, main_metric(self.cfg), mode="max"
            )
            index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            ret.insert(index + 1, best)
        if self.cfg.SEED >= 0:
            ret.insert(0, ReseedEachIteration(self.cfg.SEED))
        ret.append(ReplicaConsistencyCheck())
        return ret

    def build_checkpointer(self) -> AtomicCheckpointer:
        """The run's checkpointer: the model and this trainer's state, in ``OUTPUT_DIR``,
        loaded as :class:`~nl_detectron.checkpoint.NonLocalCheckpointer` loads and saved
        atomically."""
        return AtomicCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's, and the training data continues where the resumed checkpoint was."""
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.start_batch = self.start_iter
            restart_data_loader(self._trainer, loader)

    def train(self):
        """detectron2's training; a :class:`UserInputError` that stops it (bad data, NaN loss)
        is logged as one line, without a traceback."""
        with user_errors_logged_without_traceback():
            return super().train()

    def run_step(self) -> None:
        """detectron2's step; a NaN / inf loss raises :class:`TrainingDivergedError`."""
        try:
            super().run_step()
        except FloatingPointError as e:
            _, losses = parse_d2_message(str(e))
            last = (
                self.checkpointer.get_checkpoint_file()
                if self.checkpointer.has_checkpoint()
                else ""
            )
            message = diverged_message(self.iter, losses, self.cfg, last)
            raise TrainingDivergedError(message) from None

    def state_dict(self) -> dict[str, Any]:
        """Iteration and hook states (the scheduler's), and the optimizer state."""
        ret = super().state_dict()
        if not TRAINER_SAVES_TRAINER_STATE:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved; a checkpoint without the optimizer state
        (written by Detectron2 v0.6's own trainer) resumes with a warning."""
        if "_trainer" not in state_dict:
            logger.warning(
                "The checkpoint has no optimizer state (Detectron2 v0.6's DefaultTrainer does not "
                "save it): resuming with the optimizer's momentum reset to zero."
            )
            TrainerBase.load_state_dict(self, state_dict)
            return
        super().load_state_dict(state_dict)
        if not TRAINER_SAVES_TRAINER_STATE:
            self._trainer.load_state_dict(state_dict["_trainer"])
