"""nl_detectron: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2.

Importing the package registers its backbones, heads and the bundled datasets with Detectron2's
registries (the datasets are generated lazily, the first time they are loaded), and the FLOP and
activation handles that Detectron2's model analysis lacks for the block's operators
(nl_detectron.analysis).
"""

from .third_party_warnings import quiet_third_party_imports

# Detectron2 warns about its own use of deprecated torch APIs when it is imported: not the user's
# concern (nl_detectron.third_party_warnings lists each).
with quiet_third_party_imports():
    from . import data  # noqa: F401  (registers the bundled datasets)
    from .analysis import register_analysis_handles
    from .config import add_nonlocal_config
    from .layers import NonLocalBlock
    from .modeling import (
        NonLocalKRCNNConvDeconvUpsampleHead,
        NonLocalMaskRCNNConvUpsampleHead,
        build_non_local_resnet_backbone,
        build_non_local_resnet_fpn_backbone,
    )

    register_analysis_handles()

__version__ = "0.1.0"

__all__ = [
    "NonLocalBlock",
    "NonLocalKRCNNConvDeconvUpsampleHead",
    "NonLocalMaskRCNNConvUpsampleHead",
    "add_nonlocal_config",
    "build_non_local_resnet_backbone",
    "build_non_local_resnet_fpn_backbone",
]
