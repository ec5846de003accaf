"""Vanilla checkpoints load into NL models: every vanilla name is kept, only NL keys are new.

A renamed key would lose its pretrained weights with nothing but a log line (fvcore loads with
``strict=False``), so the key sets are tested exactly, for Detectron2 ``.pth`` checkpoints and
Caffe2 ``.pkl`` ones (matched by name suffix, ``res4_5_branch2a_w`` -> ``res4.5.conv1.weight``).
"""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.modeling import build_backbone, build_model
from tiny_detectors import tiny_cfg

from nl_detectron import NonLocalBlock

# The part of a key that a ResNet checkpoint names, e.g. "res4.5.conv1.weight".
_RESNET_KEY = re.compile(r"(?:^|\.)((?:stem|res[2-5])\..*)$")
_KEYPOINT_KEY = re.compile(r"^roi_heads\.keypoint_head\.((?:conv_fcn\d+|score_lowres)\..*)$")


def _block_keys(prefix: str, channels: int) -> set[str]:
    return {f"{prefix}.{k}" for k in NonLocalBlock(channels, norm="BN").state_dict()}


def _reported_missing(keys: set[str]) -> set[str]:
    """The keys torch reports missing: it fills a missing BN ``num_batches_tracked`` silently."""
    return {k for k in keys if not k.endswith(".num_batches_tracked")}


class _KeepingIncompatibleKeys(DetectionCheckpointer):
    """``DetectionCheckpointer`` that keeps the incompatible keys it would only log."""

    def _log_incompatible_keys(self, incompatible) -> None:
        self.incompatible = incompatible


def _load_keeping_incompatible_keys(model: torch.nn.Module, path) -> object:
    checkpointer = _KeepingIncompatibleKeys(model)
    checkpointer.load(str(path))
    return checkpointer.incompatible


def _models(arch: str) -> tuple[torch.nn.Module, torch.nn.Module, set[str]]:
    """Vanilla and NL tiny Mask (+ Keypoint) R-CNN, identical but for NL; and the NL keys.

    C4 has no keypoint head (Detectron2's ``Res5ROIHeads`` does not support one).
    """
    keypoints = arch != "C4"
    vanilla_cfg, cfg = tiny_cfg(arch, non_local=False), tiny_cfg(arch)
    for c in (vanilla_cfg, cfg):
        c.MODEL.KEYPOINT_ON = keypoints
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
    # The C4 mask head (deconv and predictor on res5 features) has no convs for NL blocks.
    cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = [2] if arch != "C4" else []
    torch.manual_seed(0)
    vanilla = build_model(vanilla_cfg)
    model = build_model(cfg)
    resnet = "backbone.bottom_up" if arch == "FPN" else "backbone"
    nl_keys = _block_keys(f"{resnet}.res4.non_local_before_5", 128)
    if arch != "C4":
        nl_keys |= _block_keys("roi_heads.mask_head.non_local_after_mask_fcn2", 32)
    for k in (2, 4, 6, 8) if keypoints else ():
        nl_keys |= _block_keys(f"roi_heads.keypoint_head.non_local_after_conv_fcn{k}", 32)
    return vanilla, model, nl_keys


@pytest.mark.parametrize("arch", ["C4", "DC5", "FPN"])
def test_backbone_keys_are_the_vanilla_keys_plus_the_block(arch):
    vanilla = build_backbone(tiny_cfg(arch, non_local=False)).state_dict()
    nl = build_backbone(tiny_cfg(arch)).state_dict()
    prefix = "bottom_up.res4.non_local_before_5" if arch == "FPN" else "res4.non_local_before_5"
    assert set(nl) == set(vanilla) | _block_keys(prefix, 128)
    assert all(nl[k].shape == v.shape for k, v in vanilla.items())


@pytest.mark.parametrize("arch", ["C4", "DC5", "FPN"])
def test_vanilla_pth_checkpoint_loads_and_gives_the_vanilla_predictions(arch, tmp_path):
    vanilla, model, nl_keys = _models(arch)
    assert set(model.state_dict()) == set(vanilla.state_dict()) | nl_keys
    DetectionCheckpointer(vanilla, save_dir=str(tmp_path)).save("vanilla")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    incompatible = _load_keeping_incompatible_keys(model, tmp_path / "vanilla.pth")
    assert set(incompatible.missing_keys) == _reported_missing(nl_keys)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []

    loaded = model.state_dict()
    for key, value in vanilla.state_dict().items():
        assert torch.equal(loaded[key], value), key
    for key in nl_keys:
        assert torch.equal(loaded[key], before[key]), key

    # The NL blocks start as identities, so the loaded NL model predicts what the vanilla did.
    image = {"image": torch.rand(3, 64, 80) * 255, "height": 64, "width": 80}
    vanilla.eval(), model.eval()
    with torch.no_grad():
        expected, got = vanilla([image])[0]["instances"], model([image])[0]["instances"]
    assert len(expected) > 0
    fields = set(expected.get_fields())
    assert fields >= {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    assert ("pred_keypoints" in fields) == (arch != "C4")
    assert set(got.get_fields()) == fields
    for field in fields:
        a, b = expected.get(field), got.get(field)
        a, b = (a.tensor, b.tensor) if field == "pred_boxes" else (a, b)
        assert torch.equal(a, b), field


def _c2_name(key: str) -> str:
    """Caffe2 (Detectron) blob name of a ResNet or keypoint head key, as in their .pkl files."""
    parts = key.split(".")
    norm_suffix = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    conv_suffix = {"weight": "w", "bias": "b"}
    if parts[0] == "stem":  # stem.conv1.weight, stem.conv1.norm.weight
        if parts[2] == "norm":
            return f"res_conv1_bn_{norm_suffix[parts[3]]}"
        return f"conv1_{conv_suffix[parts[2]]}"
    if parts[0] == "score_lowres":
        return f"kps_score_lowres_{conv_suffix[parts[1]]}"
    if parts[0].startswith("conv_fcn"):
        return f"{parts[0]}_{conv_suffix[parts[1]]}"
    stage, block, layer = parts[:3]
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
    if parts[3] == "norm":
        return f"{stage}_{block}_{branch[layer]}_bn_{norm_suffix[parts[4]]}"
    return f"{stage}_{block}_{branch[layer]}_{conv_suffix[parts[3]]}"


@pytest.mark.parametrize("arch", ["C4", "FPN"])
def test_caffe2_pkl_checkpoint_matches_every_vanilla_resnet_and_keypoint_weight(arch, tmp_path):
    vanilla, model, nl_keys = _models(arch)
    # A Detectron-style .pkl of the vanilla ResNet (incl. the C4 ROI head's res5) and keypoint
    # head: {blob name: numpy array}, as ImageNet and Detectron model-zoo files are.
    blobs, source = {}, {}
    for key, value in vanilla.state_dict().items():
        match = _RESNET_KEY.search(key) or _KEYPOINT_KEY.search(key)
        if match:
            blobs[_c2_name(match.group(1))] = value.numpy()
            source[key] = value
    assert any(name == "res4_5_branch2a_w" for name in blobs)
    with open(tmp_path / "vanilla.pkl", "wb") as f:
        pickle.dump(blobs, f)

    incompatible = _load_keeping_incompatible_keys(model, tmp_path / "vanilla.pkl")
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    missing = set(incompatible.missing_keys)
    # Inside the ResNet and the keypoint head, exactly the NL keys are left unmatched.
    in_scope = {k for k in model.state_dict() if _RESNET_KEY.search(k) or "keypoint_head" in k}
    assert missing & in_scope == _reported_missing(nl_keys & in_scope)
    assert not missing & set(source)
    loaded = model.state_dict()
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key


def test_align_and_update_state_dicts_leaves_only_the_nl_keys_unmatched():
    vanilla = build_backbone(tiny_cfg("FPN", non_local=False)).bottom_up
    model = build_model(tiny_cfg("FPN"))
    # A Detectron2-named ResNet checkpoint ("res4.5.conv1.weight"), matched by name suffix.
    ckpt = {k: v.clone() for k, v in vanilla.state_dict().items()}
    aligned = align_and_update_state_dicts(model.state_dict(), ckpt, c2_conversion=False)
    resnet_keys = {k for k in model.state_dict() if k.startswith("backbone.bottom_up.")}
    assert set(aligned) == {f"backbone.bottom_up.{k}" for k in ckpt}
    assert resnet_keys - set(aligned) == _block_keys(
        "backbone.bottom_up.res4.non_local_before_5", 128
    )
