"""Config sweep: every leaf YAML under configs/ merges and builds; NL and baseline pairs differ
only in their non-local settings; the paper's settings are the ones written down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from tiny_detectors import CONFIGS

from nl_detectron import NonLocalBlock, add_nonlocal_config

LEAVES = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("Base-"))
# Leaf -> its NL blocks (res4 has 6 / 23 / 36 blocks in R50 / R101 / X152).
PAPER_BLOCKS = {
    "mask_rcnn_nl.yaml": ["backbone.bottom_up.res4.non_local_before_5"],
    "mask_rcnn_R_101_FPN_1x_nl.yaml": ["backbone.bottom_up.res4.non_local_before_22"],
    "mask_rcnn_X_152_32x8d_FPN_IN5k_1x_nl.yaml": ["backbone.bottom_up.res4.non_local_before_35"],
    "keypoint_rcnn_nl_head_only.yaml": [
        f"roi_heads.keypoint_head.non_local_after_conv_fcn{k}" for k in (2, 4, 6, 8)
    ],
}
PAPER_BLOCKS["keypoint_rcnn_nl.yaml"] = [
    "backbone.bottom_up.res4.non_local_before_22",
    *PAPER_BLOCKS["keypoint_rcnn_nl_head_only.yaml"],
]
# Keys in which an NL config may differ from its baseline.
NL_KEYS = {"MODEL.BACKBONE.NAME", "MODEL.ROI_KEYPOINT_HEAD.NAME", "MODEL.ROI_MASK_HEAD.NAME"}


def _load(path: Path) -> CfgNode:
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _flat(node: CfgNode, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _baseline_of(path: Path) -> Path | None:
    stem = path.stem
    for suffix in ("_nl_head_only", "_dnl", "_gc", "_nl"):
        if suffix in stem:
            return path.with_name(stem.replace(suffix, "_baseline") + path.suffix)
    return None


def test_the_expected_leaves_exist():
    names = {p.name for p in LEAVES}
    assert set(PAPER_BLOCKS) <= names
    assert {"mask_rcnn_baseline.yaml", "keypoint_rcnn_baseline.yaml"} <= names


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_leaf_builds_with_its_non_local_blocks(path):
    model = build_model(_load(path))
    blocks = [n for n, m in model.named_modules() if isinstance(m, NonLocalBlock)]
    if path.name in PAPER_BLOCKS:
        assert blocks == PAPER_BLOCKS[path.name]
    elif _baseline_of(path) is None:  # a baseline
        assert blocks == []
    else:
        assert blocks


@pytest.mark.parametrize(
    "path",
    [p for p in LEAVES if _baseline_of(p) is not None],
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_nl_config_is_its_baseline_but_for_the_non_local_settings(path):
    baseline_path = _baseline_of(path)
    assert baseline_path.exists(), f"{path.name} has no baseline {baseline_path.name}"
    nl, baseline = _flat(_load(path)), _flat(_load(baseline_path))
    differ = {k for k in nl if nl[k] != baseline[k] and not k.startswith("MODEL.NONLOCAL.")}
    assert differ <= NL_KEYS | {"OUTPUT_DIR"}
    # The NL config builds blocks where its baseline builds none: another backbone or keypoint
    # head, or the same non-local builder with positions where the baseline has none.
    positions = (
        "MODEL.NONLOCAL.BACKBONE_POSITIONS",
        "MODEL.NONLOCAL.FPN_POSITIONS",
        "MODEL.NONLOCAL.BOX_FEATURE_POSITIONS",
    )
    assert (
        nl["MODEL.BACKBONE.NAME"] != baseline["MODEL.BACKBONE.NAME"]
        or nl["MODEL.ROI_KEYPOINT_HEAD.NAME"] != baseline["MODEL.ROI_KEYPOINT_HEAD.NAME"]
        or (any(nl[k] for k in positions) and not any(baseline[k] for k in positions))
    )


@pytest.mark.parametrize("path", [p for p in LEAVES if p.parent == CONFIGS], ids=lambda p: p.name)
def test_coco_leaves_use_the_1x_schedule_and_synchronised_nl_norm(path):
    cfg = _load(path)
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000) and cfg.SOLVER.MAX_ITER == 90000
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.WEIGHTS.endswith(("pkl", "IN5k"))
    if _baseline_of(path) is not None:
        assert cfg.MODEL.NONLOCAL.NORM == "SyncBN"
    if path.name.startswith("keypoint"):
        assert cfg.MODEL.KEYPOINT_ON and cfg.MODEL.RESNETS.DEPTH == 101  # paper Table 6
        assert tuple(cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS) == (512,) * 8
    else:
        assert cfg.MODEL.MASK_ON and cfg.DATASETS.TRAIN == ("coco_2017_train",)


def test_x152_config_is_resnext_152_32x8d_from_imagenet_5k():
    cfg = _load(CONFIGS / "mask_rcnn_X_152_32x8d_FPN_IN5k_1x_nl.yaml")
    r = cfg.MODEL.RESNETS
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.STRIDE_IN_1X1) == (152, 32, 8, False)
    assert cfg.MODEL.WEIGHTS == "catalog://ImageNetPretrained/FAIR/X-152-32x8d-IN5k"


def test_r50_nl_model_runs_a_forward_pass():
    cfg = _load(CONFIGS / "mask_rcnn_nl.yaml")
    cfg.MODEL.WEIGHTS = ""
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calls = []
    model.backbone.bottom_up.res4.non_local_before_5.register_forward_hook(
        lambda _, inputs, output: calls.append((inputs[0].shape, output.shape))
    )
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}])
    assert calls == [(torch.Size([1, 1024, 6, 8]), torch.Size([1, 1024, 6, 8]))]
    assert out["instances"].image_size == (96, 128)
    assert out["instances"].has("pred_masks")
