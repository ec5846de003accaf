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

from detectron2.config import CfgNode

from ..errors import TrainingDivergedError, UserInputError

__all__ = [
    "TrainingDivergedError",
    "diverged_message",
    "parse_d2_message",
    "user_errors_logged_without_traceback",
]


def diverged_message(
    iteration: int, losses: Mapping[str, float], cfg: CfgNode, last_checkpoint: str = ""
) -> str:
    """Why a run stopped at ``iteration`` with non-finite ``losses``, and what to try.

    Args:
        iteration: the iteration whose loss was not finite (0-based, as in the logs).
        losses: the loss terms of that iteration (any may be NaN / inf).
        cfg: the run's config (learning rate, warm-up, AMP).
        last_checkpoint: the last complete checkpoint, kept as it was; "" if none.
    """
    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    terms = ", ".join(bad) if bad else "the total loss"
    solver = cfg.SOLVER
    causes = [
        f"the learning rate is too high for this batch size (SOLVER.BASE_LR {solver.BASE_LR:g}, "
        f"SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH}, SOLVER.WARMUP_ITERS "
        f"{solver.WARMUP_ITERS}): lower SOLVER.BASE_LR (scale it with the batch size) or "
        "lengthen the warm-up",
        "bad annotations in the training data (boxes or keypoints that do not match their "
        "objects, coordinates in another scale)",
    ]
    if solver.AMP.ENABLED:
        causes.append(
            "a float16 overflow under mixed precision (SOLVER.AMP.ENABLED True): try "
            "SOLVER.AMP.ENABLED False to confirm"
        )
    if solver.CLIP_GRADIENTS.ENABLED is False:
        causes.append(
            "exploding gradients: SOLVER.CLIP_GRADIENTS.ENABLED True (with CLIP_TYPE 'norm') "
            "limits them"
        )
    kept = (
        f"The last complete checkpoint, {last_checkpoint}, is unchanged. --resume continues "
        "from it with the learning rate stored in it; to change SOLVER.BASE_LR, start a new run "
        f"from its weights: MODEL.WEIGHTS {last_checkpoint} with a new OUTPUT_DIR."
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
