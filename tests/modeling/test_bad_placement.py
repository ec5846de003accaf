"""Bad NL placements and norms are refused at build time, naming the key, value and fix."""

from __future__ import annotations

import re

import pytest
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.roi_heads import build_keypoint_head, build_mask_head
from tiny_detectors import tiny_cfg

from nl_detectron import NonLocalKRCNNConvDeconvUpsampleHead

KEY = re.escape("MODEL.NONLOCAL.BACKBONE_POSITIONS")


def _build_with(positions, arch="FPN"):
    cfg = tiny_cfg(arch)
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = positions
    return build_backbone(cfg)


@pytest.mark.parametrize("entry", ["res4", "res4:", "res4:x", "res4:1:2", "res4-1", "", "4"])
def test_malformed_entry(entry):
    with pytest.raises(
        ValueError,
        match=rf"{KEY} entry '{re.escape(entry)}' is malformed.*"
        r"'STAGE:INDEX' such as 'res4:-1'.*res2, res3, res4, res5",
    ):
        _build_with([entry])


def test_non_string_entry():
    with pytest.raises(ValueError, match=rf"{KEY} entry 4 is malformed"):
        _build_with([4])


@pytest.mark.parametrize("stage", ["res1", "res6", "stem", "layer3", "RES4"])
def test_unknown_stage(stage):
    with pytest.raises(
        ValueError,
        match=rf"{KEY} entry '{stage}:0': unknown stage '{stage}'; valid stages are "
        r"res2, res3, res4, res5\.",
    ):
        _build_with([f"{stage}:0"])


@pytest.mark.parametrize(
    "entry, blocks",
    [("res4:7", 6), ("res4:-7", 6), ("res2:4", 3), ("res3:-5", 4), ("res5:100", 3)],
)
def test_index_out_of_range(entry, blocks):
    with pytest.raises(
        ValueError,
        match=rf"{KEY} entry '{entry}': res\d has {blocks} blocks, so INDEX must be in "
        rf"-{blocks}\.\.{blocks} \({blocks} places the block after the last one\)",
    ):
        _build_with([entry])


def test_range_follows_the_depth():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:24"]
    with pytest.raises(ValueError, match=r"res4 has 23 blocks, so INDEX must be in -23\.\.23"):
        build_backbone(cfg)


def test_res5_of_c4_belongs_to_the_roi_head():
    with pytest.raises(
        ValueError,
        match=rf"{KEY} entry 'res5:-1': stage res5 is not built by this backbone \(it builds "
        r"res2, res3, res4\)\..*OUT_FEATURES = \['res4'\].*"
        r"MODEL\.ROI_HEADS\.NAME = 'Res5ROIHeads' \(C4\), res5 belongs to the ROI head",
    ):
        _build_with(["res5:-1"], arch="C4")


def test_stage_after_the_last_out_feature_is_not_built():
    cfg = tiny_cfg("DC5")
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3"]
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:0"]
    with pytest.raises(
        ValueError,
        match=rf"{KEY} entry 'res4:0': stage res4 is not built.*\(it builds res2, res3\)\. "
        r"MODEL\.RESNETS\.OUT_FEATURES = \['res3'\] ends at res3, so later stages are not built",
    ):
        build_backbone(cfg)


@pytest.mark.parametrize(
    "positions, first, second, where",
    [
        (["res4:-1", "res4:5"], "res4:-1", "res4:5", "non_local_before_5"),
        (["res2:0", "res2:-3"], "res2:0", "res2:-3", "non_local_before_0"),
        (["res4:6", "res3:1", "res4:6"], "res4:6", "res4:6", "non_local_after_5"),
    ],
)
def test_duplicates(positions, first, second, where):
    with pytest.raises(
        ValueError,
        match=rf"{KEY} entries '{first}' and '{second}' both place a block at {where} of "
        r"res\d; list each position once\.",
    ):
        _build_with(positions)


def test_before_the_first_and_after_the_last_block_are_different_positions():
    res3 = _build_with(["res3:4", "res3:-0"]).bottom_up.res3
    assert [name for name, _ in res3.named_children()] == [
        "non_local_before_0",
        "0",
        "1",
        "2",
        "3",
        "non_local_after_3",
    ]


@pytest.mark.parametrize("arch", ["C4", "FPN"])
def test_frozen_bn_is_refused_for_the_backbone(arch):
    cfg = tiny_cfg(arch)
    cfg.MODEL.NONLOCAL.NORM = "FrozenBN"
    with pytest.raises(
        ValueError,
        match=r'MODEL\.NONLOCAL\.NORM = "FrozenBN" is not supported.*'
        r'Set MODEL\.NONLOCAL\.NORM to "SyncBN", "BN", "GN" or ""',
    ):
        build_backbone(cfg)


def test_frozen_bn_is_refused_for_the_heads_even_with_a_vanilla_backbone():
    cfg = tiny_cfg("FPN", non_local=False)
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
    cfg.MODEL.NONLOCAL.NORM = "FrozenBN"
    with pytest.raises(ValueError, match=r"MODEL\.NONLOCAL\.NORM"):
        build_model(cfg)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("NORM", "LN", r"Invalid MODEL\.NONLOCAL setting: Unknown norm 'LN'.*valid norms"),
        ("PAIRWISE", "cosine", r"Invalid MODEL\.NONLOCAL setting: .*'cosine'.*valid ones"),
        ("BOTTLENECK_RATIO", 0.0, r"MODEL\.NONLOCAL\.BOTTLENECK_RATIO must be positive"),
    ],
)
def test_bad_block_options_are_refused_naming_the_node(key, value, message):
    cfg = tiny_cfg("FPN")
    cfg.MODEL.NONLOCAL[key] = value
    with pytest.raises(ValueError, match=message):
        build_backbone(cfg)


ROI = ShapeSpec(channels=16, height=14, width=14)


@pytest.mark.parametrize(
    "positions, bad", [([2, 9], "9"), ([0], "0"), ([-1], "-1"), ([2.0], "2.0"), ([True], "True")]
)
def test_keypoint_head_positions_out_of_range(positions, bad):
    cfg = tiny_cfg("FPN")
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
    cfg.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = positions
    with pytest.raises(
        ValueError,
        match=r"MODEL\.NONLOCAL\.KEYPOINT_HEAD_POSITIONS = .*: position "
        rf"{re.escape(bad)} is invalid; the head has 8 convs, so each position must be an "
        r"integer in 1\.\.8\.",
    ):
        build_keypoint_head(cfg, ROI)


def test_keypoint_head_default_positions_need_eight_convs():
    with pytest.raises(ValueError, match=r"position 4 is invalid; the head has 3 convs"):
        NonLocalKRCNNConvDeconvUpsampleHead(ROI, num_keypoints=17, conv_dims=[32] * 3)


def test_mask_head_positions():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
    cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = [5]
    with pytest.raises(
        ValueError,
        match=r"MODEL\.NONLOCAL\.MASK_HEAD_POSITIONS = \[5\]: position 5 is invalid; the head "
        r"has 4 convs",
    ):
        build_mask_head(cfg, ROI)
    cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = [1, 1]
    with pytest.raises(
        ValueError, match=r"MODEL\.NONLOCAL\.MASK_HEAD_POSITIONS = \[1, 1\] lists a conv twice"
    ):
        build_mask_head(cfg, ROI)


def test_mask_head_without_convs_takes_no_blocks():
    cfg = tiny_cfg("C4")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
    cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = [1]
    with pytest.raises(
        ValueError,
        match=r"MODEL\.NONLOCAL\.MASK_HEAD_POSITIONS = \[1\]: the head has no convs to put NL "
        r"blocks after; leave MODEL\.NONLOCAL\.MASK_HEAD_POSITIONS empty",
    ):
        build_model(cfg)
