"""Non-local blocks between the convs of Detectron2's sequential RoI heads: the insertion, and
the mixin that the keypoint and mask heads share.

Detectron2's keypoint and mask heads are ``nn.Sequential`` modules that run their children in
registration order (which also keeps them scriptable). NL blocks are inserted by re-registering
the children in execution order with the blocks in between; no existing child is renamed, so
vanilla checkpoints load, and the upstream ``layers()`` runs the blocks in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from detectron2.config import CfgNode
from torch import nn

from ..config import non_local_block_args
from .blocks import build_non_local_block

__all__ = ["NonLocalHeadMixin", "insert_head_non_local_blocks"]


def insert_head_non_local_blocks(
    head: nn.Sequential,
    *,
    anchors: Sequence[str],
    channels: Sequence[int],
    positions: Sequence[int],
    key: str,
    name_format: str,
    bottleneck_ratio: float = 0.5,
    block_args: Mapping[str, Any] | None = None,
) -> list[str]:
    """Insert an NL block after the k-th conv of ``head`` for each k in ``positions``.

    Args:
        head: the head, already built and initialised.
        anchors: name of the child after which the block for conv k goes (``anchors[k - 1]``:
            the conv itself, or its ReLU where that is a separate child).
        channels: output channels of conv k (``channels[k - 1]``).
        positions: 1-based conv indices; each in ``1..len(anchors)``, listed once.
        key: the config key the positions come from, named in errors.
        name_format: name of the block after conv k, ``name_format.format(k)``.
        bottleneck_ratio: inner channels of each block as a fraction of its channels.
        block_args: other ``NonLocalBlock`` keyword arguments; default: the block's defaults.

    Returns:
        The names of the inserted blocks, in execution order.

    Raises:
        ValueError: naming ``key``, for a position out of range or listed twice.
    """
    num_convs = len(anchors)
    positions = list(positions)
    if positions and num_convs == 0:
        raise ValueError(
            f"{key} = {positions}: the head has no convs to put NL blocks after; leave {key} "
            f"empty or give the head convs."
        )
    for k in positions:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_convs:
            raise ValueError(
                f"{key} = {positions}: position {k!r} is invalid; the head has {num_convs} "
                f"convs, so each position must be an integer in 1..{num_convs}."
            )
    if len(set(positions)) != len(positions):
        raise ValueError(f"{key} = {positions} lists a conv twice; list each conv once.")

    blocks = {
        anchors[k - 1]: (
            name_format.format(k),
            build_non_local_block(
                channels[k - 1], bottleneck_ratio=bottleneck_ratio, block_args=block_args
            ),
        )
        for k in sorted(positions)
    }
    children = list(head.named_children())
    for name, _ in children:
        delattr(head, name)
    for name, module in children:
        head.add_module(name, module)
        if name in blocks:
            head.add_module(*blocks[name])
    return [name for name, _ in blocks.values()]


class NonLocalHeadMixin:
    """NL blocks for a Detectron2 head whose layers are its sequential children.

    A head class sets :attr:`positions_key` (its ``MODEL.NONLOCAL`` key), takes the keyword
    arguments ``non_local_positions``, ``non_local_bottleneck_ratio`` and ``non_local_args`` in
    ``__init__``, calls :meth:`_insert_non_local_blocks` after the upstream ``__init__`` (which
    initialises its own layers, so the blocks keep theirs: zero gamma, identity), and extends
    the upstream ``from_config`` with :meth:`_non_local_from_config`.
    """

    positions_key: ClassVar[str]  # e.g. "KEYPOINT_HEAD_POSITIONS"

    @classmethod
    def _non_local_from_config(cls, cfg: CfgNode, ret: dict[str, Any]) -> dict[str, Any]:
        """``ret`` (the upstream ``from_config``) with the NL keyword arguments added."""
        ret["non_local_positions"] = list(cfg.MODEL.NONLOCAL[cls.positions_key])
        ret["non_local_bottleneck_ratio"] = cfg.MODEL.NONLOCAL.BOTTLENECK_RATIO
        ret["non_local_args"] = non_local_block_args(cfg)
        return ret

    def _insert_non_local_blocks(
        self,
        *,
        anchors: Sequence[str],
        channels: Sequence[int],
        positions: Sequence[int],
        name_format: str,
        bottleneck_ratio: float,
        block_args: Mapping[str, Any] | None,
    ) -> list[str]:
        """:func:`insert_head_non_local_blocks` on this head, errors naming its config key."""
        return insert_head_non_local_blocks(
            self,
            anchors=anchors,
            channels=channels,
            positions=positions,
            key=f"MODEL.NONLOCAL.{self.positions_key}",
            name_format=name_format,
            bottleneck_ratio=bottleneck_ratio,
            block_args=block_args,
        )
