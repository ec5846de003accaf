"""Stopping a diverged training run with a message that names the iteration and the likely cause.

Detectron2's ``SimpleTrainer`` raises ``FloatingPointError("Loss became infinite or NaN at
iteration=...")`` before the optimizer step of a step whose loss is not finite, so the weights are
still those of the previous step; :class:`TrainingDivergedError` replaces it with the iteration,
the losses that were not finite and what to try.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from detectron2.config import CfgNode

from ..errors import TrainingDivergedError, UserInputError

__all__ = [
    "SolverSettings",
    "TrainingDivergedError",
    "diverged_message",
    "parse_d2_message",
    "user_errors_logged_without_traceback",
]


@dataclass(frozen=True)
class SolverSettings:
    """What the divergence message quotes of a run's solver, with the config keys to change."""

    base_lr: float
    batch_size: int
    warmup_iters: int
    amp: bool
    clip_gradients: bool
    keys: Mapping[str, str] = field(
        default_factory=lambda: {
            "base_lr": "SOLVER.BASE_LR",
            "batch_size": "SOLVER.IMS_PER_BATCH",
            "warmup_iters": "SOLVER.WARMUP_ITERS",
            "amp": "SOLVER.AMP.ENABLED",
            "clip_gradients": "SOLVER.CLIP_GRADIENTS.ENABLED True (with CLIP_TYPE 'norm')",
            "weights": "MODEL.WEIGHTS",
            "output_dir": "OUTPUT_DIR",
        }
    )

    @classmethod
    def from_config(cls, cfg: CfgNode) -> SolverSettings:
        solver = cfg.SOLVER
        return cls(
            solver.BASE_LR,
            solver.IMS_PER_BATCH,
            solver.WARMUP_ITERS,
            bool(solver.AMP.ENABLED),
            bool(solver.CLIP_GRADIENTS.ENABLED),
        )


def diverged_message(
    iteration: int,
    losses: Mapping[str, float],
    solver: SolverSettings | CfgNode,
    last_checkpoint: str = "",
) -> str:
    """Why a run stopped at ``iteration`` with non-finite ``losses``, and what to try.

    Args:
        iteration: the iteration whose loss was not finite (0-based, as in the logs).
        losses: the loss terms of that iteration (any may be NaN / inf).
        solver: the run's solver settings (or its yacs config).
        last_checkpoint: the last complete checkpoint, kept as it was; "" if none.
    """
    if isinstance(solver, CfgNode):
        solver = SolverSettings.from_config(solver)
    keys = solver.keys
    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    terms = ", ".join(bad) if bad else "the total loss"
    causes = [
        f"the learning rate is too high for this batch size ({keys['base_lr']} "
        f"{solver.base_lr:g}, {keys['batch_size']} {solver.batch_size}, "
        f"{keys['warmup_iters']} {solver.warmup_iters}): lower {keys['base_lr']} (scale it with "
        "the batch size) or lengthen the warm-up",
        "bad annotations in the training data (boxes or keypoints that do not match their "
        "objects, coordinates in another scale)",
    ]
    if solver.amp:
        causes.append(
            f"a float16 overflow under mixed precision ({keys['amp']} True): try "
            f"{keys['amp']} False to confirm"
        )
    if not solver.clip_gradients:
        causes.append(f"exploding gradients: {keys['clip_gradients']} limits them")
    kept = (
        f"The last complete checkpoint, {last_checkpoint}, is unchanged. --resume continues "
        f"from it with the learning rate stored in it; to change {keys['base_lr']}, start a new "
        f"run from its weights: {keys['weights']} {last_checkpoint} with a new "
        f"{keys['output_dir']}."
        if last_checkpoint
        else "No checkpoint had been written yet."
    )
    listed = "".join(f"\n  - {c}" for c in causes)
    return (
        f"Training diverged at iteration {iteration}: {terms} (loss terms: "
        f"{_format_losses(losses)}). Likely causes:{listed}\n{kept}"
    )


def _format_losses(losses: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in losses.items())


# Detectron2's message: "Loss became infinite or NaN at iteration=12!\nloss_dict = {...}", the
# values printed as 0.5, nan, inf or np.float64(nan).
_ITERATION = re.compile(r"iteration=(\d+)")
_LOSS = re.compile(r"'(\w+)': (?:np\.float\d+\()?(-?(?:nan|inf|[0-9.]+(?:e[-+]?\d+)?))")


def parse_d2_message(message: str) -> tuple[int | None, dict[str, float]]:
    """The iteration and the loss terms in Detectron2's ``FloatingPointError`` message (None and
    ``{}`` where it does not have them)."""
    match = _ITERATION.search(message)
    iteration = int(match.group(1)) if match else None
    losses = {name: float(value) for name, value in _LOSS.findall(message)}
    return iteration, losses


class _OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FloatingPointError):
            # Detectron2 main logs the NaN-loss error with its traceback where it writes the
            # metrics; the trainer turns it into a TrainingDivergedError, logged as one line.
            return False
        if isinstance(error, UserInputError):
            record.msg, record.args = f"Training stopped: {error}", ()
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def user_errors_logged_without_traceback() -> Iterator[None]:
    """Within the block, Detectron2's training loop logs a :class:`UserInputError` that stops
    training as one line (it logs every exception with its traceback before re-raising it), and
    not the ``FloatingPointError`` of a NaN loss, which the trainer reports as a
    :class:`TrainingDivergedError`."""
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    one_line = _OneLine()
    train_loop.addFilter(one_line)
    try:
        yield
    finally:
        train_loop.removeFilter(one_line)
