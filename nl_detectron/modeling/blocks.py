"""Non-local blocks built from ``MODEL.NONLOCAL`` values, with errors that name the key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..layers import NonLocalBlock

__all__ = ["add_feature_blocks", "apply_feature_blocks", "build_non_local_block"]


def build_non_local_block(
    channels: int, *, bottleneck_ratio: float = 0.5, block_args: Mapping[str, Any] | None = None
) -> NonLocalBlock:
    """A ``NonLocalBlock`` of ``channels`` with ``channels * bottleneck_ratio`` inner channels and
    the other ``block_args`` (pairwise, sub_sample, scale, norm, init_std).

    Raises:
        ValueError: naming ``MODEL.NONLOCAL``, for ``norm="FrozenBN"`` (it would freeze the zero
            gamma of every block and keep the blocks no-ops), a non-positive ratio, and any value
            the block refuses (unknown pairwise function or norm, ...).
    """
    block_args = dict(block_args or {})
    if block_args.get("norm") == "FrozenBN":
        raise ValueError(
            'MODEL.NONLOCAL.NORM = "FrozenBN" is not supported: a non-local block starts as an '
            "identity because the gamma of its norm is 0, and a frozen BN never updates it. "
            'Set MODEL.NONLOCAL.NORM to "SyncBN", "BN", "GN" or "" (MODEL.RESNETS.NORM may stay '
            '"FrozenBN").'
        )
    if not bottleneck_ratio > 0:
        raise ValueError(
            f"MODEL.NONLOCAL.BOTTLENECK_RATIO must be positive (paper: 0.5); got "
            f"{bottleneck_ratio!r}."
        )
    try:
        return NonLocalBlock(
            channels, inner_channels=int(channels * bottleneck_ratio), **block_args
        )
    except ValueError as e:
        raise ValueError(f"Invalid MODEL.NONLOCAL setting: {e}") from None


def add_feature_blocks(
    module: nn.Module,
    levels: Sequence[str],
    channels: Mapping[str, int],
    *,
    key: str,
    bottleneck_ratio: float = 0.5,
    block_args: Mapping[str, Any] | None = None,
) -> list[str]:
    """Adds one block per named feature map to ``module`` as ``non_local_<level>`` and returns
    the levels in order.

    Args:
        levels: features that get a block, e.g. ``["p2"]``.
        channels: the features that can have one, and their channels.
        key: the config key that names ``levels`` (for the error), e.g.
            ``"MODEL.NONLOCAL.FPN_POSITIONS"``.

    Raises:
        ValueError: naming ``key``, for a level not in ``channels`` or listed twice.
    """
    levels = list(levels)
    for level in levels:
        if level not in channels or levels.count(level) > 1:
            raise ValueError(
                f"{key} = {levels}: {level!r} is not one of the features it can name "
                f"({', '.join(channels)}), or is listed twice."
            )
        block = build_non_local_block(
            channels[level], bottleneck_ratio=bottleneck_ratio, block_args=block_args
        )
        module.add_module(f"non_local_{level}", block)
    return levels


def apply_feature_blocks(
    module: nn.Module, levels: Sequence[str], features: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``features`` with each of ``levels`` through the block :func:`add_feature_blocks` added
    to ``module`` for it (a new dict; the others unchanged)."""
    out = dict(features)
    for level in levels:
        out[level] = getattr(module, f"non_local_{level}")(out[level])
    return out
