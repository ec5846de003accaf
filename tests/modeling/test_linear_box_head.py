"""The linear box head: flattened RoI features straight into Detectron2's box predictor."""

from __future__ import annotations

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_box_head
from detectron2.utils.events import EventStorage
from tiny_detectors import H, W, synthetic_instances, tiny_cfg

from nl_detectron.modeling import LinearBoxHead


def _linear_cfg():
    cfg = tiny_cfg("FPN")
    cfg.MODEL.ROI_BOX_HEAD.NAME = "LinearBoxHead"
    return cfg


def test_flattens_the_pooled_features_without_parameters() -> None:
    head = build_box_head(_linear_cfg(), ShapeSpec(channels=8, height=7, width=7))
    assert isinstance(head, LinearBoxHead)
    assert list(head.parameters()) == []
    assert head.output_shape.channels == 8 * 7 * 7
    x = torch.randn(5, 8, 7, 7)
    assert torch.equal(head(x), x.reshape(5, -1))
    assert head(x[:0]).shape == (0, 8 * 7 * 7)  # images without proposals


def test_detector_trains_and_predicts_with_it() -> None:
    torch.manual_seed(0)
    model = build_model(_linear_cfg())
    box_head = model.roi_heads.box_head
    assert isinstance(box_head, LinearBoxHead)
    # the scores are one linear layer of the pooled features
    assert model.roi_heads.box_predictor.cls_score.in_features == box_head.output_shape.channels
    inputs = [{"image": torch.rand(3, H, W) * 255, "instances": synthetic_instances(2)}]
    with EventStorage():
        losses = model(inputs)
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, H, W) * 255}])
    assert out["instances"].image_size == (H, W)
