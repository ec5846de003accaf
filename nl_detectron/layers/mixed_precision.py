"""The block under autocast (AMP): what runs in the autocast dtype and what stays in float32.

Autocast casts the inputs of matrix products (``bmm``, ``baddbmm``, ``matmul``, convolutions) to
float16 / bfloat16 and leaves other ops alone. Two consequences for the block:

- a float32 product that a pairwise form computes on purpose (inputs upcast with
  :func:`~nl_detectron.layers.tensor_ops.upcast`) would be cast back to half precision, where
  its logits or sums can overflow float16 (65504). :func:`float32_region` runs such a form with
  autocast switched off;
- a weight expanded to the batch (a stride-0 view) would be cast by materialising one copy per
  sample. :func:`autocast_dtype` lets the caller cast the small weight first.

Fused attention needs neither: its kernels take half-precision inputs and accumulate in float32.
Everything here is skipped under TorchScript, which has no autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "float32_region"]


@torch.jit.unused
def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts matrix products to on ``device_type`` now, or None when autocast
    is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@torch.jit.unused
def float32_region(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with autocast off on the device of the tensor arguments and their half
    precision tensors in float32. Without autocast, plain ``fn(*args)``."""
    device_type = next(a.device.type for a in args if isinstance(a, Tensor))
    if autocast_dtype(device_type) is None:
        return fn(*args)
    args = tuple(
        a.float() if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
        for a in args
    )
    with torch.autocast(device_type, enabled=False):
        return fn(*args)
