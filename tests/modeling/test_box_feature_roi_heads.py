"""NonLocalBoxFeatureROIHeads: NL blocks on the box branch's features only; the RPN and the mask
head read the features as they are, and a vanilla checkpoint loads."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny_detectors import H, W, synthetic_instances, tiny_cfg

from nl_detectron.config import load_config
from nl_detectron.engine import Trainer
from nl_detectron.errors import UserInputError
from nl_detectron.layers import NonLocalBlock, non_local_blocks, runs_on_rois
from nl_detectron.modeling import NonLocalBoxFeatureROIHeads
from nl_detectron.preflight import check_inputs

from training_runs import REPO  # isort: skip


def _cfg(gate_init: float = 0.0, levels=("p2",)):
    cfg = tiny_cfg("FPN", non_local=False)
    cfg.MODEL.ROI_HEADS.NAME = "NonLocalBoxFeatureROIHeads"
    cfg.MODEL.NONLOCAL.BOX_FEATURE_POSITIONS = list(levels)
    cfg.MODEL.NONLOCAL.GATE_INIT = gate_init
    return cfg


def _images() -> list[dict]:
    torch.manual_seed(1)
    return [{"image": torch.rand(3, H, W) * 255, "instances": synthetic_instances(2)}]


def test_starts_as_the_vanilla_detector_and_loads_its_checkpoint() -> None:
    torch.manual_seed(0)
    vanilla = build_model(tiny_cfg("FPN", non_local=False)).eval()
    model = build_model(_cfg()).eval()
    assert isinstance(model.roi_heads, NonLocalBoxFeatureROIHeads)
    assert [n for n, _ in non_local_blocks(model)] == ["roi_heads.non_local_p2"]
    assert not runs_on_rois("roi_heads.non_local_p2")  # an image-level block
    result = model.load_state_dict(vanilla.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        k.startswith("roi_heads.non_local_p2.") for k in result.missing_keys
    )
    images = [{"image": x["image"]} for x in _images()]
    with torch.no_grad():
        (expected,), (got,) = vanilla(images), model(images)
    assert len(expected["instances"]) > 0  # the comparison below is not of empty outputs
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = expected["instances"].get(field), got["instances"].get(field)
        a = a.tensor if hasattr(a, "tensor") else a
        b = b.tensor if hasattr(b, "tensor") else b
        assert torch.equal(a, b), field


def test_only_the_box_branch_reads_the_blocks_output() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(gate_init=1.0))
    block = model.roi_heads.non_local_p2
    seen: dict[str, list[torch.Tensor]] = {"block_out": [], "box": [], "mask": [], "p2": []}
    block.register_forward_hook(lambda m, a, out: seen["block_out"].append(out))
    model.backbone.register_forward_hook(lambda m, a, out: seen["p2"].append(out["p2"]))
    for name in ("box", "mask"):
        pooler = getattr(model.roi_heads, f"{name}_pooler")
        pooler.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0][0]))
    with EventStorage():
        losses = model(_images())
    assert len(seen["block_out"]) == 1
    assert seen["box"][0] is seen["block_out"][0]
    assert seen["mask"][0] is seen["p2"][0]
    assert not torch.equal(seen["block_out"][0], seen["p2"][0])  # the gate is open
    # the box losses train the block; the mask loss does not reach it
    losses["loss_mask"].backward(retain_graph=True)
    assert all(p.grad is None for p in block.parameters())
    losses["loss_cls"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert isinstance(block, NonLocalBlock)


def test_a_level_the_box_head_does_not_read_is_refused_by_name() -> None:
    with pytest.raises(UserInputError, match=r"BOX_FEATURE_POSITIONS = \['p7'\].*p2"):
        Trainer.build_model(_cfg(levels=("p7",)))


def test_positions_without_these_roi_heads_are_refused_before_training() -> None:
    config = REPO / "configs" / "context" / "mask_rcnn_baseline_context.yaml"
    cfg = load_config(str(config), ["MODEL.NONLOCAL.BOX_FEATURE_POSITIONS", "['p2']"])
    with pytest.raises(
        UserInputError, match="ROI_HEADS.NAME is 'StandardROIHeads'.*NonLocalBoxFeatureROIHeads"
    ):
        check_inputs(cfg)
