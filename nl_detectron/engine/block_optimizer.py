"""One optimizer, two update rules: Detectron2's SGD for the detector, AdamW for the parameter
groups marked ``"adamw": True`` (the non-local blocks', with ``MODEL.NONLOCAL.OPTIMIZER
"AdamW"``).

Why the blocks may want their own rule: the gradient of an attention logit is proportional to the
attention weight it changes, so while a block's attention is near uniform over M keys the
gradients of theta and phi are about 1/M of their working scale, and an SGD step a learning rate
that suits the convolutions leaves them where they are for longer than a short schedule lasts.
AdamW's step does not scale with the gradient's size (docs/evidence.md measures the difference on
the pairwise task).

The groups are shared with two inner optimizers (``torch.optim.SGD`` and ``torch.optim.AdamW``),
so a scheduler that scales ``group["lr"]`` and Detectron2's gradient clipping, which wraps
``step``, act on both rules alike; ``state_dict`` holds both inner states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

__all__ = ["SGDWithAdamWGroups"]

ADAMW_KEY = "adamw"


class SGDWithAdamWGroups(torch.optim.Optimizer):
    """SGD for every parameter group but those with ``group["adamw"]`` true, which AdamW updates
    (``betas`` and ``eps`` AdamW's defaults unless the group sets them; ``weight_decay``, as
    AdamW's decoupled decay, and ``lr`` the group's own).

    Args:
        params: parameter groups (dicts with ``params`` and, for SGD, ``lr``, ``momentum``,
            ``weight_decay``, ``nesterov``, ``dampening``; for AdamW ``lr`` and
            ``weight_decay``), as ``torch.optim.SGD`` takes them.
        lr, momentum, weight_decay, nesterov, dampening: defaults of the SGD groups, as
            ``torch.optim.SGD``'s.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        dampening: float = 0.0,
    ) -> None:
        groups = [dict(g) for g in params]
        sgd_groups = [g for g in groups if not g.get(ADAMW_KEY, False)]
        adamw_groups = [g for g in groups if g.get(ADAMW_KEY, False)]
        if not sgd_groups or not adamw_groups:
            raise ValueError(
                "SGDWithAdamWGroups needs at least one SGD group and one group marked "
                f"{ADAMW_KEY!r}: True; got {len(sgd_groups)} and {len(adamw_groups)}."
            )
        for group in adamw_groups:
            # SGD's keys mean nothing to AdamW; dropping them keeps AdamW's checks quiet
            for key in ("momentum", "nesterov", "dampening"):
                group.pop(key, None)
        self._sgd = torch.optim.SGD(
            sgd_groups,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            dampening=dampening,
        )
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, weight_decay=weight_decay)
        # The inner optimizers hold the same group dicts: what a scheduler writes reaches them.
        super().__init__(self._sgd.param_groups + self._adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sgd.step()
        self._adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"sgd": self._sgd.state_dict(), "adamw": self._adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"sgd", "adamw"}:
            raise ValueError(
                "This optimizer state is not an SGDWithAdamWGroups state (keys "
                f"{sorted(state_dict)}): it was saved with another MODEL.NONLOCAL.OPTIMIZER. "
                "Resume with the optimizer it was saved with, or start a new OUTPUT_DIR."
            )
        self._sgd.load_state_dict(state_dict["sgd"])
        self._adamw.load_state_dict(state_dict["adamw"])
