"""A box head without layers of its own: the RoI's pooled features, flattened, go straight to
Detectron2's box predictor, so the class scores and box deltas are linear in them.

Detectron2's ``FastRCNNConvFCHead`` needs at least one conv or FC layer. The context
benchmark measures how the depth between the non-local block and the classifier slows the
learning of the block's attention (docs/evidence.md); this head is its shallowest end.

    MODEL.ROI_BOX_HEAD.NAME "LinearBoxHead"
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY
from torch import nn


@ROI_BOX_HEAD_REGISTRY.register()
class LinearBoxHead(nn.Module):
    """Flattens ``(R, C, P, P)`` pooled features to ``(R, C * P * P)``; no parameters."""

    @configurable
    def __init__(self, input_shape: ShapeSpec):
        super().__init__()
        self._output_size = (
            input_shape.channels * (input_shape.height or 1) * (input_shape.width or 1)
        )

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        return {"input_shape": input_shape}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, start_dim=1)

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._output_size)
