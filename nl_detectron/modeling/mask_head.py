"""Mask R-CNN head with non-local blocks between its convs (beyond the paper; off by default)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from .non_local_head import NonLocalHeadMixin

__all__ = ["NonLocalMaskRCNNConvUpsampleHead"]


@ROI_MASK_HEAD_REGISTRY.register()
class NonLocalMaskRCNNConvUpsampleHead(NonLocalHeadMixin, MaskRCNNConvUpsampleHead):
    """Detectron2's mask head (3x3 convs, deconv, 1x1 predictor) with NL blocks after convs.

    Input: ``(R, C, 14, 14)`` RoI features; output: ``(R, num_classes, 28, 28)`` mask logits;
    R may be 0. Upstream's modules keep their names (``mask_fcn1``..., ``deconv``,
    ``predictor``), so vanilla checkpoints load; the NL block after conv k is
    ``non_local_after_mask_fcn{k}``. With no positions it is the vanilla head.
    """

    positions_key = "MASK_HEAD_POSITIONS"

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dims: Sequence[int],
        non_local_positions: Sequence[int] = (),
        non_local_bottleneck_ratio: float = 0.5,
        non_local_args: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            input_shape, num_classes, conv_dims, kwargs: as ``MaskRCNNConvUpsampleHead``
                (``conv_dims``: the 3x3 convs' channels, then the deconv's).
            non_local_positions: 1-based indices k of the 3x3 convs followed by an NL block
                (after the conv's norm and ReLU). The paper has none in the mask head.
            non_local_bottleneck_ratio: inner channels of each block as a fraction of its
                channels (paper: 0.5).
            non_local_args: other ``NonLocalBlock`` keyword arguments (pairwise, sub_sample,
                scale, norm, init_std); default: the block's (paper) defaults.
        """
        # Upstream initialises its convs one by one; the NL blocks, added after, keep their own.
        super().__init__(input_shape, num_classes=num_classes, conv_dims=conv_dims, **kwargs)
        num_convs = len(conv_dims) - 1
        self._insert_non_local_blocks(
            anchors=[f"mask_fcn{k}" for k in range(1, num_convs + 1)],
            channels=list(conv_dims[:-1]),
            positions=non_local_positions,
            name_format="non_local_after_mask_fcn{}",
            bottleneck_ratio=non_local_bottleneck_ratio,
            block_args=non_local_args,
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict[str, Any]:
        return cls._non_local_from_config(cfg, super().from_config(cfg, input_shape))
