#!/usr/bin/env python
"""nl_detectron: Non-local Neural Networks (Wang et al., CVPR 2018) for Detectron2."""

from setuptools import find_packages, setup

setup(
    name="nl_detectron",
    version="0.1.0",
    description="Non-local blocks for Detectron2 Mask R-CNN / Keypoint R-CNN",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["nl_detectron", "nl_detectron.*"]),
    # Detectron2 is not on PyPI: install it from source first (see README), or let `make`
    # provision it. Ranges are loose on purpose; requirements/constraints.txt pins a tested stack.
    install_requires=[
        "torch>=2.1",  # scaled_dot_product_attention(..., scale=)
        "torchvision>=0.16",
        "numpy>=1.21",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        "faster-coco-eval>=1.5",
        "matplotlib",
        "tabulate",
        "pyyaml",
    ],
    extras_require={
        "opencv": ["opencv-python-headless"],
        "dev": ["pytest", "pytest-timeout", "ruff"],
    },
)
