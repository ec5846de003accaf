"""Helpers of the visualization tests: a tiny detector config, one-hot NL blocks, the tools."""

import json
import math
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from PIL import Image

from nl_detectron.config import add_nonlocal_config
from nl_detectron.layers import NonLocalBlock

TOOLS = Path(__file__).resolve().parents[2] / "tools"


PAIRWISE = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


KEYPOINT_NAMES = ("top", "bottom", "left", "right")


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, checking that it is not a single flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 1.0, f"{path} is blank"
        return image.size


# ------------------------------------------------------------------------------------------
# A tiny COCO-format dataset and a tiny Mask + Keypoint R-CNN with random weights.


def tiny_cfg(dataset: str = "", *, pairwise: str = "") -> CfgNode:
    """A Mask + Keypoint R-CNN R50-FPN with tiny widths; random weights; keeps every detection.

    With ``pairwise``, the NL backbone (one block before the last res4 block) and the NL
    keypoint head (one block after its 2nd conv), with that pairwise function.
    """
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(KEYPOINT_NAMES)
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = [32] * 4
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = []
    cfg.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = []
    if pairwise:
        cfg.MODEL.BACKBONE.NAME = "build_non_local_resnet_fpn_backbone"
        cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
        cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:-1"]
        cfg.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = [2]
        cfg.MODEL.NONLOCAL.PAIRWISE = pairwise
        cfg.MODEL.NONLOCAL.NORM = "BN"
    cfg.TEST.DETECTIONS_PER_IMAGE = 4
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATASETS.TEST = (dataset,) if dataset else ()
    return cfg


def one_hot_block(pairwise: str, sub_sample: bool) -> NonLocalBlock:
    """A block whose query at a feature equal to e0 matches only keys equal to e1.

    theta maps channel 0 to inner channel 0, phi maps channel 1 to inner channel 0, w_f (of the
    concatenation) reads phi only, and the softmax scale is large; the Gaussian form, which has
    no embeddings, matches equal features instead.
    """
    block = NonLocalBlock(4, pairwise=pairwise, inner_channels=2, sub_sample=sub_sample, scale=50)
    with torch.no_grad():
        if block.theta is not None:
            block.theta.weight.zero_()
            block.theta.weight[0, 0] = 1
            block.phi.weight.zero_()
            block.phi.weight[0, 1] = 1
        if block.concat_project is not None:
            block.concat_project.weight.zero_()
            block.concat_project.weight[0, 2] = 1  # inner channel 0 of phi
    return block.eval()


def write_metrics(path: Path, losses: dict[str, float], ap: float, resumed: bool = False) -> Path:
    """A detectron2-style metrics.json: losses every 20 iterations, evaluations every 100."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for iteration in range(19, 300, 20):
        record = {"iteration": iteration, "lr": 0.01, "time": 0.5}
        decay = math.exp(-iteration / 200)
        record.update({key: value * decay for key, value in losses.items()})
        record["total_loss"] = sum(value * decay for value in losses.values())
        lines.append(record)
        if (iteration + 1) % 100 == 0:
            lines.append({"iteration": iteration, "bbox/AP": ap * iteration / 300, "segm/AP": ap})
    if resumed:  # a resumed run appends the iterations after its last checkpoint again
        lines += [{"iteration": 279, "total_loss": 0.123}]
    text = "\n".join(json.dumps(line) for line in lines)
    (path / "metrics.json").write_text(text + '\n{"iteration": 300, "total_l')  # still writing
    return path
