"""nl_detectron: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2."""

__version__ = "0.1.0"
