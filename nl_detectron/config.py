"""Config keys of nl_detectron: one node, ``MODEL.NONLOCAL``, for every non-local option."""

from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode as CN

from .non_local_block import NonLocalBlock

__all__ = ["add_nonlocal_config", "non_local_block_args"]


def add_nonlocal_config(cfg: CN) -> None:
    """Add the ``MODEL.NONLOCAL`` node to a Detectron2 config (in place).

    The node is read by the components nl_detectron registers: the backbones
    ``build_non_local_resnet_backbone`` / ``build_non_local_resnet_fpn_backbone`` and the heads
    ``NonLocalKRCNNConvDeconvUpsampleHead`` / ``NonLocalMaskRCNNConvUpsampleHead``. Components
    that are not selected ignore it, so a vanilla config stays vanilla.
    """
    _C = cfg
    _C.MODEL.NONLOCAL = CN()
    # Where the backbone gets NL blocks: "STAGE:INDEX" inserts one block right before block INDEX
    # (0-based; negative counts from the end; INDEX == number of blocks puts it after the last)
    # of stage STAGE (res2..res5). Paper (Sec. 6): one block before the last res4 block.
    # An empty list builds no NL block in the backbone.
    _C.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:-1"]
    # NL block after conv k (1-based) of the keypoint head. Paper (Sec. 6): 4 blocks in the
    # 8-conv head, one after every 2 convs.
    _C.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = [2, 4, 6, 8]
    # NL block after conv k (1-based) of the mask head. Not in the paper: none by default.
    _C.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = []
    # Pairwise function f: "embedded_gaussian" (paper's default), "gaussian", "dot_product",
    # "concatenation" (Sec. 3.2).
    _C.MODEL.NONLOCAL.PAIRWISE = "embedded_gaussian"
    # Channels of theta, phi and g as a fraction of the block's input channels. Paper: 0.5.
    _C.MODEL.NONLOCAL.BOTTLENECK_RATIO = 0.5
    # Max-pool phi and g by 2x2 (Sec. 3.3). Paper: True.
    _C.MODEL.NONLOCAL.SUB_SAMPLE = True
    # Scale the softmax logits by inner_channels ** -0.5 (the released code's default; the
    # Gaussian form, without embeddings, uses channels ** -0.5). False: scale 1, paper's formula.
    _C.MODEL.NONLOCAL.USE_SCALE = True
    # Norm after W_z, its gamma initialised to 0 (Sec. 4.1): "BN" (paper), "SyncBN", "GN" or ""
    # (none; W_z is zero-initialised instead). "FrozenBN" is refused: it would keep the block an
    # identity forever.
    _C.MODEL.NONLOCAL.NORM = "BN"
    # Std of the Gaussian init of the blocks' 1x1 convs. Released code: 0.01. 0: MSRA (He) init,
    # the paper's (Sec. 4.1), whose scale does not depend on the channel widths.
    _C.MODEL.NONLOCAL.INIT_STD = 0.01
    # Learning rate of the NL blocks' parameters as a multiple of SOLVER.BASE_LR (the schedule
    # and warm-up apply as to the rest). Paper: 1 (not stated otherwise).
    _C.MODEL.NONLOCAL.LR_FACTOR = 1.0


def non_local_block_args(cfg: CN) -> dict[str, Any]:
    """``NonLocalBlock`` keyword arguments from ``MODEL.NONLOCAL`` (all but the channel counts).

    Returns a dict with ``pairwise``, ``sub_sample``, ``scale``, ``norm`` and ``init_std``;
    the inner width depends on each block's channels and is given by
    ``MODEL.NONLOCAL.BOTTLENECK_RATIO``.

    Raises:
        ValueError: for ``MODEL.NONLOCAL.NORM = "FrozenBN"``, which would freeze the zero gamma
            of every block and keep the blocks no-ops, for a non-positive
            ``BOTTLENECK_RATIO``, and for a value the block refuses (unknown pairwise function
            or norm), naming ``MODEL.NONLOCAL``.
    """
    node = cfg.MODEL.NONLOCAL
    if node.NORM == "FrozenBN":
        raise ValueError(
            'MODEL.NONLOCAL.NORM = "FrozenBN" is not supported: a non-local block starts as an '
            "identity because the gamma of its norm is 0, and a frozen BN never updates it. "
            'Set MODEL.NONLOCAL.NORM to "SyncBN", "BN", "GN" or "" (MODEL.RESNETS.NORM may stay '
            '"FrozenBN").'
        )
    if not node.BOTTLENECK_RATIO > 0:
        raise ValueError(
            f"MODEL.NONLOCAL.BOTTLENECK_RATIO must be positive (paper: 0.5); got "
            f"{node.BOTTLENECK_RATIO!r}."
        )
    args = {
        "pairwise": node.PAIRWISE,
        "sub_sample": node.SUB_SAMPLE,
        # None: the block's default, inner_channels ** -0.5 as in the released code.
        "scale": None if node.USE_SCALE else 1.0,
        "norm": node.NORM,
        "init_std": node.INIT_STD if node.INIT_STD > 0 else None,
    }
    # The block's own checks (valid pairwise functions and norms) on a small probe block, so
    # that a bad value is reported with the config node it came from.
    try:
        NonLocalBlock(64, **args)
    except ValueError as e:
        raise ValueError(f"Invalid MODEL.NONLOCAL setting: {e}") from None
    return args
