"""Training from a Python (LazyConfig) config, with what the yacs ``Trainer`` has: periodic COCO
evaluation and the best checkpoint, atomic checkpoints, ``--resume`` with the optimizer state,
a diverging run stopped with the iteration and the likely causes, ``metrics.json`` and
TensorBoard events.

The config follows Detectron2's ``configs/common``: ``model``, ``optimizer``, ``lr_multiplier``,
``dataloader.{train,test,evaluator}`` and ``train`` (``output_dir``, ``init_checkpoint``,
``max_iter``, ``amp.enabled``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``,
``device``, ``seed``, ``amp.precision``: ``"float16"`` (the default) or ``"bfloat16"``, and
``precise_bn.{enabled,num_iter}``: BN statistics recomputed before each evaluation, as
``TEST.PRECISE_BN``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.engine import SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import AtomicCheckpointer, BestCheckpointer, NonLocalCheckpointer
from ..compat import create_ddp_model, restart_data_loader
from ..data.train_loader import ReseedEachIteration, ResumableTrainLoader
from ..device import amp_dtype
from ..evaluation.metrics_file import main_metric_of
from .amp import AMPTrainer
from .divergence import (
    SolverSettings,
    TrainingDivergedError,
    diverged_message,
    parse_d2_message,
    user_errors_logged_without_traceback,
)
from .launch import ReplicaConsistencyCheck

__all__ = ["clipped_sgd", "lazy_evaluate", "lazy_main_metric", "lazy_test", "lazy_train"]

logger = logging.getLogger(__name__)


def lazy_main_metric(cfg: Any) -> str:
    """The metric that picks the best model: ``segm/AP`` with a mask head, else
    ``keypoints/AP`` with a keypoint head, else ``bbox/AP``."""
    roi_heads = cfg.model.get("roi_heads", {})
    return main_metric_of(
        mask=roi_heads.get("mask_head") is not None,
        keypoints=roi_heads.get("keypoint_head") is not None,
    )


def clipped_sgd(
    params: Any,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    clip_value: float = 1.0,
    clip_type: str = "norm",
    norm_type: float = 2.0,
) -> torch.optim.Optimizer:
    """SGD whose gradients are clipped before each step as yacs' ``SOLVER.CLIP_GRADIENTS``
    clips them (``clip_type`` "norm": each parameter's gradient norm; "value": each element),
    for Python configs: Detectron2's own ``maybe_add_gradient_clipping``."""
    clip = CfgNode(
        {
            "SOLVER": {
                "CLIP_GRADIENTS": {
                    "ENABLED": True,
                    "CLIP_TYPE": clip_type,
                    "CLIP_VALUE": clip_value,
                    "NORM_TYPE": norm_type,
                }
            }
        }
    )
    return maybe_add_gradient_clipping(clip, torch.optim.SGD)(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def _solver_settings(cfg: Any) -> SolverSettings:
    lr_multiplier = cfg.get("lr_multiplier", {})
    warmup = lr_multiplier.get("warmup_length", 0.0) or 0.0
    return SolverSettings(
        base_lr=float(cfg.optimizer.get("lr", float("nan"))),
        batch_size=int(cfg.dataloader.train.get("total_batch_size", 0)),
        warmup_iters=int(round(float(warmup) * cfg.train.max_iter)),
        amp=bool(cfg.train.amp.enabled),
        clip_gradients="clip_value" in cfg.optimizer,
        keys={
            "base_lr": "optimizer.lr",
            "batch_size": "dataloader.train.total_batch_size",
            "warmup_iters": "lr_multiplier.warmup_length x train.max_iter",
            "amp": "train.amp.enabled",
            "clip_gradients": "optimizer = L(nl_detectron.engine.lazy_trainer.clipped_sgd)"
            "(..., clip_value=...)",
            "weights": "train.init_checkpoint",
            "output_dir": "train.output_dir",
        },
    )


class _StopOnDivergence:
    """The run step of a Detectron2 trainer, with a NaN / inf loss reported as a
    :class:`TrainingDivergedError` (iteration, losses, likely causes, last checkpoint)."""

    solver: SolverSettings
    checkpointer: AtomicCheckpointer

    def run_step(self) -> None:
        try:
            super().run_step()  # type: ignore[misc]
        except FloatingPointError as e:
            _, losses = parse_d2_message(str(e))
            checkpointer = self.checkpointer
            last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
            raise TrainingDivergedError(
                diverged_message(self.iter, losses, self.solver, last)  # type: ignore[attr-defined]
            ) from None


class _SimpleTrainer(_StopOnDivergence, SimpleTrainer):
    pass


class _AMPTrainer(_StopOnDivergence, AMPTrainer):
    pass


def lazy_test(cfg: Any, model: Any) -> dict[str, Any]:
    """COCO evaluation of ``model`` on ``dataloader.test`` with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def lazy_evaluate(cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """``--eval-only``: the weights of ``train.init_checkpoint`` (or the last checkpoint of
    ``train.output_dir`` with ``resume``), evaluated."""
    model = instantiate(cfg.model).to(cfg.train.device)
    model = create_ddp_model(model)
    NonLocalCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
        cfg.train.init_checkpoint, resume=resume
    )
    return lazy_test(cfg, model)


def lazy_train(cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (see the module docstring); returns the last evaluation's results."""
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    if cfg.train.amp.enabled:
        precision = amp_dtype(cfg.train.amp.get("precision", "float16"), "train.amp.precision")
        trainer = _AMPTrainer(model, train_loader, optimizer, precision=precision)
    else:
        trainer = _SimpleTrainer(model, train_loader, optimizer)
    output_dir = cfg.train.output_dir
    checkpointer = AtomicCheckpointer(model, output_dir, trainer=trainer)
    trainer.solver, trainer.checkpointer = _solver_settings(cfg), checkpointer

    results: dict[str, Any] = {}

    def test_and_keep() -> dict[str, Any]:
        results.clear()
        results.update(lazy_test(cfg, model))
        return results

    eval_period = cfg.train.eval_period
    seed = cfg.train.get("seed", -1)
    precise_bn = cfg.train.get("precise_bn", {})
    trainer.register_hooks(
        [
            ReseedEachIteration(seed) if seed is not None and seed >= 0 else None,
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PreciseBN(
                eval_period, model, instantiate(cfg.dataloader.train), precise_bn.num_iter
            )
            if precise_bn.get("enabled", False)
            else None,
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(eval_period, test_and_keep),
            BestCheckpointer(eval_period, checkpointer, lazy_main_metric(cfg), mode="max")
            if comm.is_main_process() and eval_period > 0
            else None,
            hooks.PeriodicWriter(
                default_writers(output_dir, cfg.train.max_iter), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
            ReplicaConsistencyCheck(),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if isinstance(train_loader, ResumableTrainLoader):
        train_loader.start_batch = start_iter
        restart_data_loader(trainer, train_loader)
    os.makedirs(output_dir, exist_ok=True)
    with user_errors_logged_without_traceback():
        trainer.train(start_iter, cfg.train.max_iter)
    return results
