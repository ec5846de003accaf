"""Tensor helpers of the non-local block: 1x1 convolutions as matrix products, precision, pooling.

Shapes: N is the batch, L a number of positions (all spatial positions flattened), C channels.
Every tensor stays channels-first like the block's input, ``(N, C, L)``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .mixed_precision import autocast_dtype

__all__ = [
    "MaxPoolKeepingIndices",
    "conv_matrix",
    "linear",
    "pointwise",
    "pool_window",
    "rows",
    "shape_str",
    "upcast",
]


def shape_str(shape: list[int]) -> str:
    """``str(tuple(shape))``, also under TorchScript."""
    items = [str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def upcast(t: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; other dtypes unchanged."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return t.float()
    return t


def conv_matrix(conv_weight: Tensor) -> Tensor:
    """A 1x1(x1) convolution's weight as a matrix: ``(C_out, C_in, 1, ...) -> (C_out, C_in)``."""
    return conv_weight.flatten(1)


def linear(weight: Tensor, bias: Optional[Tensor], flat: Tensor) -> Tensor:
    """``(N, C_in, L) -> (N, C_out, L)`` by a ``(C_out, C_in)`` or per-sample ``(N, C_out, C_in)``
    weight and a ``(C_out)`` or ``(N, C_out)`` bias (or None). Also accepts ``flat`` as a
    transposed view.

    A shared ``(C_out, C_in)`` weight is applied by the kernel that suits the device:

    - on accelerators, a 1x1 ``conv1d`` (cuDNN): TF32 in float32 like every other convolution of
      the model (``torch.backends.cudnn.allow_tf32``, on by default, where ``bmm`` follows the
      stricter ``torch.backends.cuda.matmul.allow_tf32``), and autocast casts the small weight;
    - on the CPU, a batched product over the weight expanded to the batch (a view): about twice
      the speed of ``conv1d`` there, every tensor and gradient channels-first. Under autocast the
      weight is cast before it is expanded, else autocast would cast the expanded view by
      materialising one copy per sample and keep it for the backward pass.
    """
    if weight.dim() == 2:
        if flat.device.type != "cpu":
            # (C_out, C_in) -> (C_out, C_in, 1): (N, C_in, L) -> (N, C_out, L)
            return F.conv1d(flat, weight.unsqueeze(2), bias)
        if not torch.jit.is_scripting():
            dtype = autocast_dtype("cpu")
            if dtype is not None:
                weight = weight.to(dtype)
        # (C_out, C_in) -> (N, C_out, C_in), a view: a batched product copies neither operand
        # (torch.matmul would fold the batch into a transposed copy of flat)
        weight = weight.expand(flat.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(weight, flat)
    # (..., C_out) -> (..., C_out, 1); + (N, C_out, C_in) @ (N, C_in, L) -> (N, C_out, L)
    return torch.baddbmm(bias.unsqueeze(-1), weight, flat)


def pointwise(conv_weight: Tensor, bias: Optional[Tensor], flat: Tensor) -> Tensor:
    """A 1x1(x1) convolution as one matrix product: ``(N, C_in, L) -> (N, C_out, L)``."""
    return linear(conv_matrix(conv_weight), bias, flat)


def rows(t: Tensor, channels: int, width: int) -> Tensor:
    """Channels-first to rows, zero-padded to ``width`` channels: ``(N, C, L) -> (N, L, width)``,
    ``C = channels``.

    Contiguous, as fused attention needs a unit stride along the channels.
    """
    # (N, C, L) -> (N, L, C)
    out = t.transpose(1, 2)
    if channels < width:
        out = F.pad(out, [0, width - channels])
    return out.contiguous()


def pool_window(dim: int) -> list[int]:
    """The sub-sampling window of a ``dim``-D block (Sec. 3.3): 2, 2x2, or 1x2x2 in spacetime."""
    return [2] if dim == 1 else [2, 2] if dim == 2 else [1, 2, 2]


class MaxPoolKeepingIndices(torch.autograd.Function):
    """Max-pooling over non-overlapping windows whose backward keeps only int32 indices.

    ``F.max_pool*d`` saves its input and int64 indices for the backward pass; with windows equal
    to the stride each input position receives the gradient of at most one output, so the
    indices alone give the gradient (a scatter), identical to PyTorch's. At res3 of a COCO image
    this takes about 80 MB off the peak of a forward + backward pass.
    """

    @staticmethod
    def forward(ctx, t: Tensor, window: list[int], ceil_mode: bool) -> Tensor:  # type: ignore[override]
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(window) - 1]
        out, indices = pool(t, window, window, 0, 1, ceil_mode, True)
        ctx.input_shape = t.shape
        ctx.save_for_backward(indices.to(torch.int32))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        shape = ctx.input_shape
        # (N, C, *S') -> (N, C, M) scattered into (N, C, prod(S)): the indices are per plane
        grad_input = grad.new_zeros(shape[0], shape[1], math.prod(shape[2:]))
        grad_input.scatter_(2, indices.flatten(2).long(), grad.flatten(2))
        return grad_input.view(shape), None, None
