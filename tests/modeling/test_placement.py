"""NL blocks sit exactly where MODEL.NONLOCAL.BACKBONE_POSITIONS says, and run there."""

from __future__ import annotations

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from tiny_detectors import tiny_cfg
from torch import nn

from nl_detectron import NonLocalBlock


def _resnet(backbone: nn.Module) -> nn.Module:
    """The ResNet of a C4/DC5 backbone (itself) or of an FPN (its bottom-up)."""
    return getattr(backbone, "bottom_up", backbone)


def _execution_order(backbone: nn.Module, image_size: int = 64) -> list[str]:
    """Names (``res4.non_local_before_5``) of the stage children in the order they run."""
    resnet = _resnet(backbone)
    order: list[str] = []
    handles = [
        child.register_forward_hook(lambda *_, name=f"{stage}.{child_name}": order.append(name))
        for stage in resnet.stage_names
        for child_name, child in getattr(resnet, stage).named_children()
    ]
    backbone.eval()
    with torch.no_grad():
        backbone(torch.rand(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return order


def _non_local_names(backbone: nn.Module) -> list[str]:
    return [n for n, m in _resnet(backbone).named_modules() if isinstance(m, NonLocalBlock)]


def test_default_is_one_block_before_the_last_res4_block_of_r50():
    backbone = build_backbone(tiny_cfg("FPN"))
    assert _non_local_names(backbone) == ["res4.non_local_before_5"]
    order = _execution_order(backbone)
    res4 = [name for name in order if name.startswith("res4.")]
    # R50's res4 has 6 blocks: the NL block runs between the 5th and the 6th.
    assert res4 == [f"res4.{i}" for i in range(5)] + ["res4.non_local_before_5", "res4.5"]
    assert len(order) == 3 + 4 + 7 + 3
    block = _resnet(backbone).res4.non_local_before_5
    # A tiny R50 (res2 32 channels): res4 has 128 channels, inner 64 (paper: 1024 / 512).
    assert (block.in_channels, block.inner_channels) == (128, 64)
    assert block.out_norm.__class__ is nn.BatchNorm2d


@pytest.mark.parametrize("arch", ["C4", "DC5", "FPN"])
def test_several_positions_run_in_order(arch):
    cfg = tiny_cfg(arch)
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:6", "res2:0", "res3:-2", "res4:-6"]
    if arch != "C4":  # C4 has no res5 in its backbone
        cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS += ["res5:1"]
    backbone = build_backbone(cfg)
    expected = (
        ["res2.non_local_before_0", "res2.0", "res2.1", "res2.2"]
        + ["res3.0", "res3.1", "res3.non_local_before_2", "res3.2", "res3.3"]
        + ["res4.non_local_before_0"]
        + [f"res4.{i}" for i in range(6)]
        + ["res4.non_local_after_5"]
    )
    if arch != "C4":
        expected += ["res5.0", "res5.non_local_before_1", "res5.1", "res5.2"]
    assert _execution_order(backbone) == expected
    resnet = _resnet(backbone)
    # Each block takes the channels of the feature map where it sits: before block 0 of a
    # stage that is the previous stage's output.
    channels = {
        name: m.in_channels for name, m in resnet.named_modules() if isinstance(m, NonLocalBlock)
    }
    assert channels["res2.non_local_before_0"] == 8  # stem output
    assert channels["res3.non_local_before_2"] == 64
    assert channels["res4.non_local_before_0"] == 64  # res3 output
    assert channels["res4.non_local_after_5"] == 128
    if arch != "C4":
        assert channels["res5.non_local_before_1"] == 256


@pytest.mark.parametrize("arch", ["C4", "DC5", "FPN"])
def test_outputs_keep_the_vanilla_shapes_and_stages_list(arch):
    nl = build_backbone(tiny_cfg(arch))
    vanilla = build_backbone(tiny_cfg(arch, non_local=False))
    assert nl.output_shape() == vanilla.output_shape()
    resnet = _resnet(nl)
    # ResNet.forward runs `stages`; the registered attributes must be the same modules.
    assert all(getattr(resnet, n) is s for n, s in zip(resnet.stage_names, resnet.stages))
    x = torch.rand(1, 3, 64, 96)
    nl.eval(), vanilla.eval()
    with torch.no_grad():
        shapes = {k: v.shape for k, v in nl(x).items()}
        assert shapes == {k: v.shape for k, v in vanilla(x).items()}


def test_empty_positions_build_the_vanilla_resnet():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = []
    backbone = build_backbone(cfg)
    assert _non_local_names(backbone) == []
    vanilla = build_backbone(tiny_cfg("FPN", non_local=False))
    assert backbone.state_dict().keys() == vanilla.state_dict().keys()


def test_deeper_resnets_count_their_own_blocks():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:-1", "res3:-1"]
    assert _non_local_names(build_backbone(cfg)) == [
        "res3.non_local_before_3",
        "res4.non_local_before_22",
    ]


def test_block_options_come_from_the_config():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.NONLOCAL.PAIRWISE = "dot_product"
    cfg.MODEL.NONLOCAL.BOTTLENECK_RATIO = 0.25
    cfg.MODEL.NONLOCAL.SUB_SAMPLE = False
    cfg.MODEL.NONLOCAL.NORM = "GN"
    cfg.MODEL.NONLOCAL.INIT_STD = 0.02
    block = _resnet(build_backbone(cfg)).res4.non_local_before_5
    assert (block.pairwise, block.inner_channels, block.sub_sample) == ("dot_product", 32, False)
    assert isinstance(block.out_norm, nn.GroupNorm)
    assert 0.015 < block.theta.weight.std().item() < 0.025

    cfg.MODEL.NONLOCAL.PAIRWISE = "embedded_gaussian"
    cfg.MODEL.NONLOCAL.USE_SCALE = False
    assert _resnet(build_backbone(cfg)).res4.non_local_before_5.scale == 1.0
    cfg.MODEL.NONLOCAL.USE_SCALE = True
    assert _resnet(build_backbone(cfg)).res4.non_local_before_5.scale == 32**-0.5


def test_frozen_stages_freeze_the_pretrained_blocks_but_not_the_nl_blocks():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.BACKBONE.FREEZE_AT = 5  # stem and all four stages
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res2:1", "res4:-1"]
    resnet = _resnet(build_backbone(cfg))
    for name, param in resnet.named_parameters():
        assert param.requires_grad == ("non_local" in name), name
    for block in (resnet.res2.non_local_before_1, resnet.res4.non_local_before_5):
        # Converted to FrozenBN, the zero gamma would keep the block an identity for good.
        assert type(block.out_norm) is nn.BatchNorm2d
    assert isinstance(resnet.res4[0].conv1.norm, FrozenBatchNorm2d)
