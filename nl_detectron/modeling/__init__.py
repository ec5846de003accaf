"""Detectron2 components with non-local blocks, registered with Detectron2's registries on
import: the ResNet / ResNeXt backbones (C4, DC5, FPN) and the keypoint and mask heads."""

from .blocks import build_non_local_block
from .keypoint_head import NonLocalKRCNNConvDeconvUpsampleHead
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
    "NonLocalFPN",
    "NonLocalHeadMixin",
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
