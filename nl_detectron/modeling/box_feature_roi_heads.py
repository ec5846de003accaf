"""Detectron2's ``StandardROIHeads`` whose box branch pools from features that first went
through NL blocks; the RPN and the mask and keypoint branches read the features as they are.

A block on an FPN level (``MODEL.NONLOCAL.FPN_POSITIONS``) writes into the features every head
reads, so the box regression, the mask and the RPN losses all train it, and for them what it
carries from far away is noise. Here only the box branch (class scores and box deltas) reads
and trains it. Not in the paper, which places its block in res4; measured on the context data
in docs/evidence.md.

    MODEL.ROI_HEADS.NAME "NonLocalBoxFeatureROIHeads"
    MODEL.NONLOCAL.BOX_FEATURE_POSITIONS ["p2"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from ..config import non_local_block_args
from .blocks import add_feature_blocks, apply_feature_blocks


@ROI_HEADS_REGISTRY.register()
class NonLocalBoxFeatureROIHeads(StandardROIHeads):
    """Its children are ``StandardROIHeads``' under their names, plus ``non_local_p2``... (a
    vanilla checkpoint loads; the blocks start as identities with ``GATE_INIT`` 0)."""

    @configurable
    def __init__(
        self,
        *,
        non_local_levels: Sequence[str],
        non_local_channels: Mapping[str, int],
        non_local_bottleneck_ratio: float = 0.5,
        non_local_args: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            non_local_levels: box-branch input features that get an NL block, e.g. ``["p2"]``.
            non_local_channels: channels of each feature.
            non_local_bottleneck_ratio: inner channels as a fraction of a feature's channels.
            non_local_args: other ``NonLocalBlock`` keyword arguments.
            kwargs: as ``StandardROIHeads``.
        """
        super().__init__(**kwargs)
        self.non_local_levels = add_feature_blocks(
            self,
            non_local_levels,
            {name: non_local_channels[name] for name in self.box_in_features},
            key="MODEL.NONLOCAL.BOX_FEATURE_POSITIONS",
            bottleneck_ratio=non_local_bottleneck_ratio,
            block_args=non_local_args,
        )

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        ret = super().from_config(cfg, input_shape)
        node = cfg.MODEL.NONLOCAL
        ret["non_local_levels"] = list(node.BOX_FEATURE_POSITIONS)
        ret["non_local_channels"] = {name: shape.channels for name, shape in input_shape.items()}
        ret["non_local_bottleneck_ratio"] = node.BOTTLENECK_RATIO
        ret["non_local_args"] = non_local_block_args(cfg)
        return ret

    def _forward_box(self, features: dict[str, torch.Tensor], proposals):
        features = apply_feature_blocks(self, self.non_local_levels, features)
        return super()._forward_box(features, proposals)
