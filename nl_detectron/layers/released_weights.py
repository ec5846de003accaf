"""Non-local blocks from the weights of FAIR's released code, through its PyTorch port.

pytorchvideo's ``NonLocal`` (``pytorchvideo.layers.nonlocal_net``, the port of the released
video code) max-pools x before phi and g, in floor mode, and has a bias in its output conv
before the norm. :func:`from_pytorchvideo` builds the :class:`NonLocalBlock` that computes the
same function (``pool_input=True, ceil_mode=False``) and maps the weights into it; the output
conv's bias, which a batch norm makes redundant, is folded into the norm's running mean (exact:
in training the batch mean absorbs it, in evaluation the running mean does).
"""

from typing import Any

import torch
from torch import nn

from .non_local_block import NonLocalBlock

__all__ = ["from_pytorchvideo"]

_PAIRWISE = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}


def from_pytorchvideo(module: Any) -> NonLocalBlock:
    """The ``NonLocalBlock`` equal to a pytorchvideo ``NonLocal`` (3D), with its weights.

    Raises:
        ValueError: for a pooling other than none or 1x2x2, a norm other than BatchNorm3d, or an
            instantiation other than ``"softmax"`` / ``"dot_product"``.
    """
    instantiation = module.instantiation
    if instantiation not in _PAIRWISE:
        raise ValueError(
            f"pytorchvideo NonLocal instantiation {instantiation!r} has no NonLocalBlock "
            f"counterpart; supported: {sorted(_PAIRWISE)}."
        )
    pool = module.pool
    kernel = None if pool is None else tuple(_triple(pool.kernel_size))
    if kernel not in (None, (1, 1, 1), (1, 2, 2)) or (
        pool is not None and tuple(_triple(pool.stride)) != kernel
    ):
        raise ValueError(
            f"pytorchvideo NonLocal pooling {pool} is not supported: NonLocalBlock sub-samples by "
            "1x2x2 (kernel = stride), or not at all."
        )
    norm = module.norm
    if norm is not None and not isinstance(norm, nn.BatchNorm3d):
        raise ValueError(f"pytorchvideo NonLocal norm {type(norm).__name__} is not supported.")
    theta = module.conv_theta
    block = NonLocalBlock(
        theta.in_channels,
        dim=3,
        pairwise=_PAIRWISE[instantiation],
        inner_channels=theta.out_channels,
        sub_sample=kernel == (1, 2, 2),
        pool_input=True,
        ceil_mode=False,
        norm="BN" if norm is not None else "",
    )
    state = {
        f"{ours}.{name}": value
        for theirs, ours in (("conv_theta", "theta"), ("conv_phi", "phi"), ("conv_g", "g"))
        for name, value in getattr(module, theirs).state_dict().items()
    }
    out_conv = module.conv_out.state_dict()
    state["out_conv.weight"] = out_conv["weight"]
    if norm is None:
        state["out_conv.bias"] = out_conv.get("bias", torch.zeros(theta.in_channels))
    else:
        block.out_norm.eps, block.out_norm.momentum = norm.eps, norm.momentum
        norm_state = dict(norm.state_dict())
        if "bias" in out_conv:  # BN(W y + b) = BN(W y) with the running mean moved by b
            norm_state["running_mean"] = norm_state["running_mean"] - out_conv["bias"]
        state.update({f"out_norm.{k}": v for k, v in norm_state.items()})
    block.load_state_dict(state)
    return block


def _triple(value: Any) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)
