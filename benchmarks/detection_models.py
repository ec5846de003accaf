"""The models, inputs and runner of the end-to-end benchmarks (benchmark_end_to_end.py and
investigate_non_local_profile.py).

Each model of :data:`MODELS` is an NL config and its baseline config:

- ``mask_rcnn``: R50-FPN Mask R-CNN, ``configs/mask_rcnn_baseline.yaml`` vs
  ``configs/mask_rcnn_nl.yaml`` (+1 NL block before the last res4 block);
- ``keypoint_rcnn``: R101-FPN Keypoint R-CNN, ``configs/keypoint_rcnn_baseline.yaml`` vs
  ``configs/keypoint_rcnn_nl_head_only.yaml`` (+4 NL blocks in the keypoint head).

Set-up. Random weights (``MODEL.WEIGHTS ""``); the NL model gets every weight of the baseline
and its NL blocks are identities at initialisation (zero gamma), so both models compute the same
proposals, RoIs and detections and differ only by the work of the NL blocks. The frozen batch
norms of the random ResNet get the statistics of their inputs on the benchmark images, as
pretrained ones would have (otherwise a random R101 overflows). ``SCORE_THRESH_TEST = 0``
makes inference run the mask / keypoint head on ``TEST.DETECTIONS_PER_IMAGE`` (100) boxes per
image, as a trained model typically does on COCO. Training uses the config's optimizer
(``detectron2.solver.build_optimizer``, SGD with momentum and weight decay) with lr 0, which does
the same arithmetic as any lr but keeps the weights, and with a fixed seed before each step the
sampled RoIs, identical across repeats and models. Inputs: random uint8 images with 5 random
ground-truth boxes, polygon masks and 17 visible keypoints each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from common import ROOT
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances, Keypoints, PolygonMasks
from torch import Tensor, nn

from nl_detectron.config import add_nonlocal_config
from nl_detectron.layers import non_local_blocks

VARIANTS = ("baseline", "nl")
NUM_GT = 5  # ground-truth instances per training image
NUM_KEYPOINTS = 17
SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """A baseline config and its NL counterpart, paths relative to the repository root."""

    baseline: str
    nl: str
    description: str
    keypoints: bool

    def config(self, variant: str) -> str:
        return self.baseline if variant == "baseline" else self.nl


MODELS = {
    "mask_rcnn": ModelSpec(
        "configs/mask_rcnn_baseline.yaml",
        "configs/mask_rcnn_nl.yaml",
        "R50-FPN Mask R-CNN, +1 NL block before the last res4 block",
        keypoints=False,
    ),
    "keypoint_rcnn": ModelSpec(
        "configs/keypoint_rcnn_baseline.yaml",
        "configs/keypoint_rcnn_nl_head_only.yaml",
        "R101-FPN Keypoint R-CNN, +4 NL blocks in the keypoint head",
        keypoints=True,
    ),
}

# (height, width) of the input images: COCO's 800-pixel shorter side, a small size, a tiny one.
SIZES = {"coco": (800, 1216), "small": (320, 480), "quick": (128, 192)}


# ---------------------------------------------------------------------------------------------
# Models and inputs


def build_cfg(spec: ModelSpec, variant: str, device: str, quick: bool = False) -> CfgNode:
    """The config of ``spec``'s baseline or NL model, set up for a random-weight benchmark."""
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(str(ROOT / spec.config(variant)))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    # Every box reaches the mask / keypoint head (100 per image), as with a trained model.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    # lr 0: the step's arithmetic is unchanged, the weights (hence the sampled RoIs) stay fixed.
    cfg.SOLVER.BASE_LR = 0.0
    if quick:
        # Fewer proposals, sampled RoIs and detections: a smoke run in seconds.
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def build_models(
    spec: ModelSpec,
    device: str,
    calibration: list[dict[str, Any]],
    variants: Sequence[str] = VARIANTS,
    quick: bool = False,
) -> dict[str, tuple[nn.Module, CfgNode]]:
    """The baseline and/or NL model, sharing every baseline weight; NL blocks are identities.

    The baseline's frozen batch norms are calibrated on ``calibration`` first (see
    :func:`calibrate_frozen_batch_norms`). Returns ``{variant: (model, cfg)}``.
    """
    torch.manual_seed(SEED)
    cfg = build_cfg(spec, "baseline", device, quick)
    baseline = build_model(cfg)
    calibrate_frozen_batch_norms(baseline, calibration)
    models = {}
    if "baseline" in variants:
        models["baseline"] = (baseline, cfg)
    if "nl" in variants:
        nl_cfg = build_cfg(spec, "nl", device, quick)
        nl = build_model(nl_cfg)
        result = nl.load_state_dict(baseline.state_dict(), strict=False)
        blocks = [name for name, _ in non_local_blocks(nl)]
        stray = [k for k in result.missing_keys if not k.startswith(tuple(b + "." for b in blocks))]
        if result.unexpected_keys or stray or not blocks:
            raise RuntimeError(
                f"{spec.nl} is not {spec.baseline} plus NL blocks: NL blocks {blocks}, missing "
                f"{stray}, unexpected {result.unexpected_keys}."
            )
        models["nl"] = (nl, nl_cfg)
    return models


def calibrate_frozen_batch_norms(model: nn.Module, inputs: list[dict[str, Any]]) -> None:
    """Give every ``FrozenBatchNorm2d`` the per-channel statistics of its input on ``inputs``.

    With random weights and the identity statistics of a fresh frozen BN, activations grow
    block after block until a deep ResNet overflows (R101: non-finite boxes, no detections).
    One backbone pass in which each frozen BN first takes its input's mean and variance
    normalises them as pretrained statistics would. Only values change, not the work.
    """
    from detectron2.layers import FrozenBatchNorm2d

    def take_statistics(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [
        m.register_forward_pre_hook(take_statistics)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    model.eval()
    try:
        with torch.no_grad():
            model.backbone(model.preprocess_image(inputs).tensor)
    finally:
        for handle in handles:
            handle.remove()


def _polygon(box: Sequence[float], vertices: int = 16) -> np.ndarray:
    """An ellipse inscribed in ``box`` (x0, y0, x1, y1), as a flat COCO polygon."""
    x0, y0, x1, y1 = box
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    xs = (x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(angles)
    ys = (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(angles)
    return np.stack([xs, ys], axis=1).ravel()


def make_inputs(
    size: tuple[int, int], batch: int, keypoints: bool, seed: int
) -> list[dict[str, Any]]:
    """``batch`` Detectron2 input dicts: a random uint8 image and ``NUM_GT`` random instances."""
    height, width = size
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        # boxes of 1/8 to 1/2 of the image side
        wh = torch.rand(NUM_GT, 2, generator=g) * 0.375 + 0.125
        xy = torch.rand(NUM_GT, 2, generator=g) * (1 - wh)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([xy * scale, (xy + wh) * scale], dim=1)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        # Keypoint R-CNN has one class (person); Mask R-CNN COCO's 80.
        num_classes = 1 if keypoints else 80
        instances.gt_classes = torch.randint(0, num_classes, (NUM_GT,), generator=g)
        instances.gt_masks = PolygonMasks([[_polygon(b)] for b in boxes.tolist()])
        if keypoints:
            # (G, 2) + (G, 1, 2) * (G, K, 2) -> (G, K, 2) points inside the boxes, visibility 2
            points = boxes[:, None, :2] + (boxes[:, None, 2:] - boxes[:, None, :2]) * torch.rand(
                NUM_GT, NUM_KEYPOINTS, 2, generator=g
            )
            visible = torch.full((NUM_GT, NUM_KEYPOINTS, 1), 2.0)
            instances.gt_keypoints = Keypoints(torch.cat([points, visible], dim=2))
        inputs.append({"image": image, "height": height, "width": width, "instances": instances})
    return inputs


def inference_inputs(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first input without its ground truth: one image, as at test time."""
    return [{k: v for k, v in inputs[0].items() if k != "instances"}]


# ---------------------------------------------------------------------------------------------
# A training step and an inference; the NL blocks' inputs


def autocast(
    device: str, amp: bool, dtype: torch.dtype = torch.float16
) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (float16 or bfloat16) on ``device`` with ``--amp``, else nothing."""
    if amp:
        return torch.autocast(device, dtype=dtype)
    return contextlib.nullcontext()


class Runner:
    """One model with its optimizer: a training step and an inference on fixed inputs."""

    def __init__(
        self,
        model: nn.Module,
        cfg: CfgNode,
        train_inputs: list[dict[str, Any]],
        device: str,
        amp: bool,
        precision: torch.dtype = torch.float16,
    ) -> None:
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        # loss scaling for float16 only, as nl_detectron.engine.amp.AMPTrainer
        self.scaler = torch.amp.GradScaler(device) if amp and precision == torch.float16 else None
        self.train_inputs = train_inputs
        self.test_inputs = inference_inputs(train_inputs)
        self.device = device
        self.amp = amp
        self.precision = precision

    def train_step(self) -> dict[str, Tensor]:
        """Forward + backward + optimizer step; the same RoIs are sampled every time."""
        self.model.train()
        torch.manual_seed(SEED)
        with autocast(self.device, self.amp, self.precision):
            losses = self.model(self.train_inputs)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return losses

    def inference(self) -> list[dict[str, Any]]:
        """Detections for one image."""
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.amp, self.precision):
            return self.model(self.test_inputs)
