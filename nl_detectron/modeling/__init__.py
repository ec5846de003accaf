"""Detectron2 components with non-local blocks, registered with Detectron2's registries on
import: the ResNet / ResNeXt backbones (C4, DC5, FPN), the keypoint and mask heads, RoI heads
whose box branch reads its features through NL blocks, and a linear box head."""

from .blocks import build_non_local_block
from .box_feature_roi_heads import NonLocalBoxFeatureROIHeads
from .keypoint_head import NonLocalKRCNNConvDeconvUpsampleHead
from .linear_box_head import LinearBoxHead
from .mask_head import NonLocalMaskRCNNConvUpsampleHead
from .non_local_head import NonLocalHeadMixin, insert_head_non_local_blocks
from .non_local_resnet import (
    NonLocalFPN,
    add_non_local_blocks,
    build_non_local_resnet_backbone,
    build_non_local_resnet_fpn_backbone,
    insert_non_local_blocks,
    parse_backbone_positions,
)

__all__ = [
    "NonLocalBoxFeatureROIHeads",
    "NonLocalFPN",
    "NonLocalHeadMixin",
    "LinearBoxHead",
    "NonLocalKRCNNConvDeconvUpsampleHead",
    "NonLocalMaskRCNNConvUpsampleHead",
    "add_non_local_blocks",
    "build_non_local_block",
    "build_non_local_resnet_backbone",
    "build_non_local_resnet_fpn_backbone",
    "insert_head_non_local_blocks",
    "insert_non_local_blocks",
    "parse_backbone_positions",
]
