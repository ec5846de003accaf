"""Tiny-width Detectron2 configs (C4, DC5, FPN; mask and keypoint heads) for fast CPU tests.

Widths are shrunk (stem 8, res2 32, bottleneck 8, FPN 32, heads 32) while depth, stage layout
and the nl_detectron components stay as in the real configs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints

import nl_detectron  # noqa: F401  (registers the backbones and heads)
from nl_detectron import add_nonlocal_config

# The image size of synthetic_instances.
H, W = 96, 128
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NL_BACKBONE = {
    "C4": "build_non_local_resnet_backbone",
    "DC5": "build_non_local_resnet_backbone",
    "FPN": "build_non_local_resnet_fpn_backbone",
}
VANILLA_BACKBONE = {
    "C4": "build_resnet_backbone",
    "DC5": "build_resnet_backbone",
    "FPN": "build_resnet_fpn_backbone",
}


def shrink(cfg: CfgNode) -> CfgNode:
    """Cut every width of ``cfg`` so that a model builds and runs in well under a second."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # Unit-variance input: with random weights and no BN statistics, raw 0..255 pixels overflow
    # the heads (keypoint softmax on inf logits).
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.NUM_GROUPS = 1
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = [32] * 8
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    return cfg


def tiny_cfg(arch: str = "FPN", *, non_local: bool = True) -> CfgNode:
    """A tiny Mask R-CNN of the given backbone layout, R50 depth, NL settings of the paper.

    Args:
        arch: ``"FPN"`` (configs/mask_rcnn_nl.yaml), ``"C4"`` (Detectron2's default layout:
            backbone up to res4, res5 in ``Res5ROIHeads``) or ``"DC5"`` (res5 dilated, in the
            backbone, standard RoI heads).
        non_local: the NL backbone builder, else the vanilla one (all else identical).
    """
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    if arch == "FPN":
        cfg.merge_from_file(str(CONFIGS / "mask_rcnn_nl.yaml"))
    elif arch == "DC5":
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
        cfg.MODEL.RESNETS.RES5_DILATION = 2
        cfg.MODEL.RPN.IN_FEATURES = ["res5"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res5"]
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
        cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    elif arch != "C4":
        raise ValueError(f"arch must be 'FPN', 'C4' or 'DC5'; got {arch!r}.")
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = (NL_BACKBONE if non_local else VANILLA_BACKBONE)[arch]
    cfg.MODEL.NONLOCAL.NORM = "BN"
    return shrink(cfg)


def synthetic_instances(num: int) -> Instances:
    """Up to 2 ground-truth objects (boxes, masks, 17 keypoints) in an ``H x W`` image."""
    inst = Instances((H, W))
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [70.0, 10.0, 120.0, 70.0]])[:num]
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor([3, 17])[:num]
    masks = torch.zeros(num, H, W, dtype=torch.bool)
    keypoints = torch.zeros(num, 17, 3)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = True
        # 17 visible keypoints spread over the box
        keypoints[i, :, 0] = torch.linspace(x0 + 2, x1 - 2, 17)
        keypoints[i, :, 1] = torch.linspace(y0 + 2, y1 - 2, 17)
        keypoints[i, :, 2] = 2
    inst.gt_masks = BitMasks(masks)
    inst.gt_keypoints = Keypoints(keypoints)
    return inst


def nl_model_with_every_head() -> torch.nn.Module:
    """The tiny NL Mask R-CNN with an NL keypoint head and an NL mask head: 6 blocks."""
    cfg = tiny_cfg("FPN")
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
    cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = [2]
    torch.manual_seed(0)
    return build_model(cfg)
