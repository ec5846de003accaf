"""Non-local blocks built from ``MODEL.NONLOCAL`` values, with errors that name the key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..layers import NonLocalBlock

__all__ = ["build_non_local_block"]


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
