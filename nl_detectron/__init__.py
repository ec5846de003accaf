"""nl_detectron: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2.

Importing the package registers its backbones, heads and datasets with Detectron2's registries.
"""

from .config import add_nonlocal_config
from .keypoint_head import NonLocalKRCNNConvDeconvUpsampleHead
from .mask_head import NonLocalMaskRCNNConvUpsampleHead
from .non_local_block import NonLocalBlock
from .non_local_resnet import build_non_local_resnet_backbone, build_non_local_resnet_fpn_backbone

__version__ = "0.1.0"

__all__ = ["NonLocalBlock"]
__all__ += [
    "NonLocalKRCNNConvDeconvUpsampleHead",
    "NonLocalMaskRCNNConvUpsampleHead",
    "add_nonlocal_config",
    "build_non_local_resnet_backbone",
    "build_non_local_resnet_fpn_backbone",
]
