"""nl_detectron: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2.

Importing the package registers its backbones, heads and datasets with Detectron2's registries.
"""

from .non_local_block import NonLocalBlock

__version__ = "0.1.0"

__all__ = ["NonLocalBlock"]
