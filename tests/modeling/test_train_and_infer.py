"""End to end: a tiny NL Mask R-CNN with an NL keypoint head trains a step and infers."""

from __future__ import annotations

import warnings

import torch
from detectron2.utils.events import EventStorage
from tiny_detectors import H, W
from tiny_detectors import nl_model_with_every_head as _model
from tiny_detectors import synthetic_instances as _instances

from nl_detectron import NonLocalBlock


def test_train_step_and_inference_with_and_without_instances():
    model = _model()
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, NonLocalBlock)}
    assert len(blocks) == 6  # res4, mask head, 4 in the keypoint head
    image = torch.rand(3, H, W) * 255
    batch = [
        {"image": image, "instances": _instances(2), "height": H, "width": W},
        {"image": image.flip(-1), "instances": _instances(0), "height": H, "width": W},
    ]

    model.train()
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {
        "loss_cls",
        "loss_box_reg",
        "loss_mask",
        "loss_keypoint",
        "loss_rpn_cls",
        "loss_rpn_loc",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # At init only the zero gamma of each block's norm gets a gradient (the block is an
    # identity, so theta/phi/g do not yet affect the loss); it is what lets the block learn.
    for name, block in blocks.items():
        assert block.out_norm.weight.grad.abs().sum() > 0, name
    # A small step: larger ones blow up this random, un-normalised (FrozenBN) tiny network.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    optimizer.step()
    assert all(block.out_norm.weight.abs().sum() > 0 for block in blocks.values())

    # A batch whose only image has no instances: the heads see 0 foreground RoIs. Detectron2
    # logs the mean number of keypoint-head samples per image, here over no image: NumPy's
    # empty-mean warnings come from that line (roi_heads.select_proposals_with_visible_keypoints).
    optimizer.zero_grad()
    with EventStorage(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered in scalar divide")
        losses = model(batch[1:])
    assert losses["loss_mask"].item() == 0 and losses["loss_keypoint"].item() == 0
    sum(losses.values()).backward()

    model.eval()
    model.roi_heads.box_predictor.test_score_thresh = 0.0  # keep random-weight detections
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
        assert len(outputs[0]["instances"]) > 0
        # No detection passes a score threshold above 1: inference with no instances.
        model.roi_heads.box_predictor.test_score_thresh = 1.01
        (empty,) = model([{"image": image, "height": H, "width": W}])
    for out in outputs:
        inst = out["instances"]
        assert inst.pred_masks.shape[1:] == (H, W)
        assert inst.pred_keypoints.shape[1:] == (17, 3)
    inst = empty["instances"]
    assert len(inst) == 0
    assert inst.pred_masks.shape == (0, H, W) and inst.pred_keypoints.shape == (0, 17, 3)
