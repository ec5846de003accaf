"""Mixed-precision training in float16 or bfloat16, on both Detectron2 hosts.

Detectron2 v0.6's ``AMPTrainer`` autocasts to float16 only; main's takes a ``precision`` but
nothing in its yacs config sets it, and it scales bfloat16 losses as if they could underflow.
Both assert CUDA. :class:`AMPTrainer` is theirs with one training step of its own: autocast to
the chosen dtype on the model's device type, and a ``GradScaler`` for float16 only (bfloat16 has
float32's exponent range and needs no loss scaling).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import detectron2.engine.defaults as d2_defaults
import torch
from detectron2.engine import AMPTrainer as _D2AMPTrainer
from torch import nn

from ..compat import TRAINER_HAS_AFTER_BACKWARD

__all__ = ["AMPTrainer", "amp_trainer_of_default_trainer"]


class AMPTrainer(_D2AMPTrainer):
    """Detectron2's ``AMPTrainer`` (checkpointed ``grad_scaler`` state, single device per
    process) with a choice of autocast dtype.

    Args:
        model, data_loader, optimizer: as ``SimpleTrainer``.
        precision: ``torch.float16`` (loss scaling, as Detectron2's) or ``torch.bfloat16``.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        *,
        precision: torch.dtype = torch.float16,
    ) -> None:
        device_type = next(model.parameters()).device.type
        grad_scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=grad_scaler)
        self.precision = precision
        self.device_type = device_type

    def run_step(self) -> None:
        """One step: the losses under autocast, their (scaled) gradients, the optimizer step."""
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if TRAINER_HAS_AFTER_BACKWARD:
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


@contextlib.contextmanager
def amp_trainer_of_default_trainer(precision: torch.dtype) -> Iterator[None]:
    """Within this context, ``DefaultTrainer.__init__`` (which builds its ``AMPTrainer`` itself,
    from ``SOLVER.AMP.ENABLED``) builds :class:`AMPTrainer` with ``precision``."""
    original = d2_defaults.AMPTrainer
    d2_defaults.AMPTrainer = functools.partial(AMPTrainer, precision=precision)
    try:
        yield
    finally:
        d2_defaults.AMPTrainer = original
