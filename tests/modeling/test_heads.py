"""Keypoint and mask heads with NL blocks: layout, run order, own init, empty batches."""

from __future__ import annotations

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import (
    KRCNNConvDeconvUpsampleHead,
    MaskRCNNConvUpsampleHead,
    build_keypoint_head,
    build_mask_head,
)
from detectron2.structures import Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from tiny_detectors import tiny_cfg
from torch import nn

from nl_detectron import (
    NonLocalBlock,
    NonLocalKRCNNConvDeconvUpsampleHead,
    NonLocalMaskRCNNConvUpsampleHead,
)

ROI_FEATURES = ShapeSpec(channels=16, height=14, width=14)
KEYPOINT_ORDER = [
    name
    for k in range(1, 9)
    for name in (f"conv_fcn{k}", f"conv_fcn_relu{k}")
    + ((f"non_local_after_conv_fcn{k}",) if k % 2 == 0 else ())
] + ["score_lowres"]


def _keypoint_head_from_cfg(norm: str = "BN") -> NonLocalKRCNNConvDeconvUpsampleHead:
    cfg = tiny_cfg("FPN")
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
    cfg.MODEL.NONLOCAL.NORM = norm
    return build_keypoint_head(cfg, ROI_FEATURES)


def _run_order(head: nn.Sequential, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    order: list[str] = []
    handles = [
        child.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, child in head.named_children()
    ]
    y = head.layers(x)
    for handle in handles:
        handle.remove()
    return order, y


def _same_weights_as(head: nn.Module, vanilla: nn.Module) -> nn.Module:
    """Load ``vanilla``'s weights into ``head``: only the NL blocks may be left over."""
    result = head.load_state_dict(vanilla.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("non_local" in k for k in result.missing_keys)
    return head


def test_keypoint_head_has_the_papers_four_blocks_after_every_two_convs():
    head = _keypoint_head_from_cfg()
    assert [n for n, m in head.named_children() if isinstance(m, NonLocalBlock)] == [
        f"non_local_after_conv_fcn{k}" for k in (2, 4, 6, 8)
    ]
    order, y = _run_order(head, torch.rand(3, 16, 14, 14))
    assert order == KEYPOINT_ORDER
    assert y.shape == (3, 17, 56, 56)
    assert head.non_local_after_conv_fcn2.in_channels == 32


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_keypoint_head_blocks_keep_their_own_init_and_start_as_identity(mode):
    torch.manual_seed(0)
    head = _keypoint_head_from_cfg()
    for k in (2, 4, 6, 8):
        block = getattr(head, f"non_local_after_conv_fcn{k}")
        # Upstream's kaiming loop would give std ~0.35 to these 1x1 convs (and fail on gamma).
        assert block.theta.weight.std().item() < 0.02
        assert torch.all(block.out_norm.weight == 0) and torch.all(block.out_norm.bias == 0)
    # Upstream's init still reaches its own convs: kaiming fan_out, std sqrt(2 / (32 * 9)).
    assert 0.06 < head.conv_fcn3.weight.std().item() < 0.1
    assert torch.all(head.conv_fcn3.bias == 0)

    vanilla = KRCNNConvDeconvUpsampleHead(ROI_FEATURES, num_keypoints=17, conv_dims=[32] * 8)
    _same_weights_as(head, vanilla)
    getattr(head, mode)(), getattr(vanilla, mode)()
    x = torch.rand(4, 16, 14, 14)
    assert torch.equal(head.layers(x), vanilla.layers(x))


def _empty_rois(training: bool, num_keypoints: int = 17) -> list[Instances]:
    inst = Instances((64, 64))
    boxes = Boxes(torch.zeros(0, 4))
    if training:
        inst.proposal_boxes = boxes
        inst.gt_classes = torch.zeros(0, dtype=torch.long)
        inst.gt_keypoints = Keypoints(torch.zeros(0, num_keypoints, 3))
    else:
        inst.pred_boxes = boxes
        inst.pred_classes = torch.zeros(0, dtype=torch.long)
    return [inst]


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "GN"])
def test_keypoint_head_accepts_zero_rois(norm):
    head = _keypoint_head_from_cfg(norm)
    x = torch.zeros(0, 16, 14, 14)
    head.train()
    with EventStorage():  # the loss logs skipped batches
        loss = head(x, _empty_rois(training=True))["loss_keypoint"]
    loss.backward()
    assert loss.item() == 0
    # Every parameter is in the graph (zero gradients), as DistributedDataParallel needs.
    assert all(p.grad is not None for p in head.parameters())
    head.eval()
    with torch.no_grad():
        (result,) = head(x, _empty_rois(training=False))
    assert result.pred_keypoints.shape == (0, 17, 3)


def test_keypoint_head_from_explicit_arguments():
    head = NonLocalKRCNNConvDeconvUpsampleHead(
        ROI_FEATURES,
        num_keypoints=5,
        conv_dims=[32, 64, 64],
        non_local_positions=[1, 3],
        non_local_bottleneck_ratio=0.25,
        non_local_args={"pairwise": "dot_product", "norm": ""},
    )
    order, y = _run_order(head, torch.rand(2, 16, 14, 14))
    assert order == [
        "conv_fcn1",
        "conv_fcn_relu1",
        "non_local_after_conv_fcn1",
        "conv_fcn2",
        "conv_fcn_relu2",
        "conv_fcn3",
        "conv_fcn_relu3",
        "non_local_after_conv_fcn3",
        "score_lowres",
    ]
    assert y.shape == (2, 5, 56, 56)
    block = head.non_local_after_conv_fcn3
    assert (block.in_channels, block.inner_channels, block.pairwise) == (64, 16, "dot_product")
    assert block.out_norm is None and torch.all(block.out_conv.weight == 0)


def test_keypoint_head_conv_norm():
    # MODEL.ROI_KEYPOINT_HEAD.NORM: a norm inside each conv (after it, before its ReLU); the
    # vanilla keys stay as they are, the norms add their own, initialised as norms are.
    plain = _keypoint_head_from_cfg()
    cfg = tiny_cfg("FPN")
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
    cfg.MODEL.ROI_KEYPOINT_HEAD.NORM = "GN"
    head = build_keypoint_head(cfg, ROI_FEATURES)
    added = set(head.state_dict()) - set(plain.state_dict())
    assert added == {f"conv_fcn{k}.norm.{p}" for k in range(1, 9) for p in ("weight", "bias")}
    assert set(plain.state_dict()) <= set(head.state_dict())
    for k in range(1, 9):
        norm = getattr(head, f"conv_fcn{k}").norm
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    order, y = _run_order(head, torch.rand(3, 16, 14, 14))
    assert order == KEYPOINT_ORDER and y.shape == (3, 17, 56, 56)
    # each conv's output is normalised: per RoI and group, mean 0
    features = head.conv_fcn1(torch.rand(3, 16, 14, 14) * 5 + 3)
    assert features.view(3, 32, -1).mean(dim=2).abs().max() < 1e-5


MASK_ORDER = [
    "mask_fcn1",
    "non_local_after_mask_fcn1",
    "mask_fcn2",
    "mask_fcn3",
    "non_local_after_mask_fcn3",
    "mask_fcn4",
    "deconv",
    "deconv_relu",
    "predictor",
]


def _mask_head(positions, norm: str = "BN") -> NonLocalMaskRCNNConvUpsampleHead:
    cfg = tiny_cfg("FPN")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"  # the NL norms must survive upstream's init too
    cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = positions
    cfg.MODEL.NONLOCAL.NORM = norm
    return build_mask_head(cfg, ROI_FEATURES)


def test_mask_head_is_vanilla_by_default():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
    head = build_mask_head(cfg, ROI_FEATURES)
    vanilla = MaskRCNNConvUpsampleHead(
        ROI_FEATURES, num_classes=80, conv_dims=[32] * 5, conv_norm=""
    )
    assert not any(isinstance(m, NonLocalBlock) for m in head.modules())
    assert list(head.state_dict()) == list(vanilla.state_dict())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mask_head_blocks_run_after_the_configured_convs_and_start_as_identity(mode):
    head = _mask_head([3, 1])
    order, y = _run_order(head, torch.rand(3, 16, 14, 14))
    assert order == MASK_ORDER
    assert y.shape == (3, 80, 28, 28)
    assert torch.all(head.non_local_after_mask_fcn3.out_norm.weight == 0)
    assert head.non_local_after_mask_fcn1.theta.weight.std().item() < 0.02

    vanilla = MaskRCNNConvUpsampleHead(
        ROI_FEATURES, num_classes=80, conv_dims=[32] * 5, conv_norm="GN"
    )
    _same_weights_as(head, vanilla)
    getattr(head, mode)(), getattr(vanilla, mode)()
    x = torch.rand(2, 16, 14, 14)
    assert torch.equal(head.layers(x), vanilla.layers(x))


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_mask_head_accepts_zero_rois(norm):
    head = _mask_head([2, 4], norm)
    x = torch.zeros(0, 16, 14, 14)
    head.train()
    loss = head(x, _empty_rois(training=True))["loss_mask"]
    loss.backward()
    assert loss.item() == 0
    assert all(p.grad is not None for p in head.parameters())
    head.eval()
    with torch.no_grad():
        (result,) = head(x, _empty_rois(training=False))
    assert result.pred_masks.shape == (0, 1, 28, 28)
