"""Fused attention for the softmax pairwise forms: which kernels may run, and the batches that
none of them takes.

``F.scaled_dot_product_attention`` picks a kernel per call among those allowed. Left to itself on
recent GPUs it may pick cuDNN's, which builds an execution plan for every new shape (reported at
about 0.4 s forward and 0.5 s backward per plan): the RoI-head blocks see a different number of
RoIs at every iteration, and multi-scale training changes the backbone's shapes, so such a run
would rebuild plans all the time. :func:`attention_backends` is the policy, a pure function
of the device, dtype and width; :func:`fused_attention` applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FLASH_MAX_WIDTH", "attention_backends", "attention_kernels_run", "fused_attention"]

# The widest head FlashAttention takes on CUDA (head dims up to 256).
FLASH_MAX_WIDTH = 256


def attention_backends(device_type: str, dtype: torch.dtype, width: int) -> list[SDPBackend]:
    """The kernels fused attention may use for one head of ``width`` channels in ``dtype`` on
    ``device_type``, best first (``sdpa_kernel`` tries them in this order).

    - Never cuDNN attention: it rebuilds its plan for every new shape (module docstring).
    - CUDA: FlashAttention for float16 / bfloat16 up to ``FLASH_MAX_WIDTH`` channels, then the
      memory-efficient kernel (any float dtype and width); both keep no ``HW x M`` map and
      accumulate in float32.
    - CPU and other devices: PyTorch's fused CPU kernel (FlashAttention's algorithm, any float
      dtype and width).
    - The math fallback last, so that a shape no fused kernel takes still runs (it materialises
      the map, but in float32 accumulation for half inputs).
    """
    if device_type == "cuda":
        backends = [SDPBackend.EFFICIENT_ATTENTION]
        if dtype in (torch.float16, torch.bfloat16) and width <= FLASH_MAX_WIDTH:
            backends.insert(0, SDPBackend.FLASH_ATTENTION)
    else:
        backends = [SDPBackend.FLASH_ATTENTION]
    return backends + [SDPBackend.MATH]


@torch.jit.unused
def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T) v`` for ``(N, heads, L, width)`` tensors, by the kernels of
    :func:`attention_backends`.

    An empty batch (no RoIs in a head) is computed with plain products of empty tensors: some
    fused kernels reject a batch of 0, and this way theta, phi and g stay in the autograd graph
    (with zero gradients), as distributed data parallel training needs on every process.
    """
    if q.shape[0] == 0:
        # (0, h, L, w) @ (0, h, w, M) -> (0, h, L, M); @ (0, h, M, w) -> (0, h, L, w)
        return torch.softmax(q @ k.transpose(2, 3) * scale, dim=3) @ v
    dtype = q.dtype
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    with sdpa_kernel(attention_backends(q.device.type, dtype, q.shape[3]), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


# The ATen op of each kernel.
_KERNEL_OPS = {
    "_scaled_dot_product_flash_attention": SDPBackend.FLASH_ATTENTION,
    "_scaled_dot_product_flash_attention_for_cpu": SDPBackend.FLASH_ATTENTION,
    "_scaled_dot_product_efficient_attention": SDPBackend.EFFICIENT_ATTENTION,
    "_scaled_dot_product_cudnn_attention": SDPBackend.CUDNN_ATTENTION,
    "_scaled_dot_product_attention_math": SDPBackend.MATH,
}


class _KernelRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kernels: set[SDPBackend] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kernel = _KERNEL_OPS.get(func._schema.name.split("::")[-1])
        if kernel is not None:
            self.kernels.add(kernel)
        return func(*args, **(kwargs or {}))


def attention_kernels_run(fn: Callable[[], Any]) -> set[SDPBackend]:
    """The fused-attention kernels that ``fn()`` ran, seen as the ATen ops it dispatched:
    which kernel a shape gets, for tests and benchmarks."""
    with _KernelRecorder() as recorder:
        fn()
    return recorder.kernels
