"""Keypoint decoding without Detectron2's overflow: the same keypoints as Detectron2 wherever its
decoding works, keypoints inside the box whatever the logits, in the NL keypoint head."""

from __future__ import annotations

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import KRCNNConvDeconvUpsampleHead
from detectron2.structures import Boxes, Instances
from detectron2.structures.keypoints import heatmaps_to_keypoints as detectron2_decoding

from nl_detectron.modeling import NonLocalKRCNNConvDeconvUpsampleHead
from nl_detectron.modeling.keypoint_decoding import heatmaps_to_keypoints


def _boxes(num: int, gen: torch.Generator) -> torch.Tensor:
    """Boxes of 0.3 to 200 px (under 1 px: clamped to 1), fractional corners."""
    corner = torch.rand(num, 2, generator=gen) * 100
    size = torch.rand(num, 2, generator=gen) * 200 + 0.3
    return torch.cat([corner, corner + size], dim=1)


@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
def test_equals_detectron2_where_it_does_not_fail(scale):
    gen = torch.Generator().manual_seed(int(scale))
    maps = torch.randn(12, 17, 56, 56, generator=gen) * scale
    rois = _boxes(12, gen)
    assert torch.equal(heatmaps_to_keypoints(maps, rois), detectron2_decoding(maps, rois))


def test_no_rois():
    out = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert out.shape == (0, 17, 4)


def _overflowing_example() -> tuple[torch.Tensor, torch.Tensor]:
    """docs/upstream.md #6: a sharp edge between logits 1000 and -500; bicubic overshoot puts the
    resized maximum more than 88 above every logit."""
    maps = torch.full((1, 1, 56, 56), -500.0)
    maps[..., :28] = 1000.0
    return maps, torch.tensor([[0.0, 0.0, 40.0, 128.0]])


def test_keypoints_where_detectron2_fails():
    maps, rois = _overflowing_example()
    with pytest.raises(AssertionError):
        detectron2_decoding(maps, rois)
    ((x, y, logit, score),) = heatmaps_to_keypoints(maps, rois)[0]
    assert 0 <= x <= 40 and 0 <= y <= 128
    assert logit > 1000 + 88  # the overshoot
    assert score == torch.finfo(torch.float32).max  # exp(> 88) / 1 saturates


@pytest.mark.parametrize("kind", ["huge", "inf", "nan"])
def test_keypoints_inside_the_box_whatever_the_logits(kind):
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 4, 56, 56, generator=gen) * 1e4
    if kind == "inf":
        maps[:, :, 10:20, 30:40] = float("inf")
        maps[:, :, 40:, :] = -float("inf")
    elif kind == "nan":
        maps[:, :2] = float("nan")
    rois = _boxes(6, gen)
    out = heatmaps_to_keypoints(maps, rois)
    x, y, score = out[..., 0], out[..., 1], out[..., 3]
    assert torch.isfinite(out[..., [0, 1, 3]]).all() and (score >= 0).all()
    assert ((x >= rois[:, None, 0]) & (x <= rois[:, None, 2] + 1)).all()
    assert ((y >= rois[:, None, 1]) & (y <= rois[:, None, 3] + 1)).all()


def _heads() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The NL head (4 blocks, identities at construction) and Detectron2's with its weights."""
    shape, kwargs = ShapeSpec(channels=8, height=14, width=14), {"num_keypoints": 4}
    torch.manual_seed(0)
    ours = NonLocalKRCNNConvDeconvUpsampleHead(shape, conv_dims=[16] * 8, **kwargs).eval()
    upstream = KRCNNConvDeconvUpsampleHead(shape, conv_dims=[16] * 8, **kwargs).eval()
    upstream.load_state_dict(ours.state_dict(), strict=False)
    return ours, upstream


def _instances(boxes: list[torch.Tensor]) -> list[Instances]:
    out = []
    for b in boxes:
        instances = Instances((480, 640))
        instances.pred_boxes = Boxes(b)
        out.append(instances)
    return out


def test_head_inference_equals_detectron2_head():
    ours, upstream = _heads()
    gen = torch.Generator().manual_seed(1)
    boxes = [_boxes(3, gen), _boxes(0, gen), _boxes(2, gen)]
    x = torch.randn(5, 8, 14, 14, generator=gen)
    with torch.no_grad():
        got, expected = ours(x, _instances(boxes)), upstream(x, _instances(boxes))
    for a, b in zip(got, expected):
        assert torch.equal(a.pred_keypoints, b.pred_keypoints)
        assert torch.equal(a.pred_keypoint_heatmaps, b.pred_keypoint_heatmaps)


def test_head_inference_on_huge_logits():
    """An unconverged head: logits of ~1e5 still give keypoints inside each box."""
    ours, _ = _heads()
    with torch.no_grad():
        ours.score_lowres.weight.mul_(1e6)
        gen = torch.Generator().manual_seed(2)
        boxes = _boxes(8, gen)
        (result,) = ours(torch.randn(8, 8, 14, 14, generator=gen), _instances([boxes]))
    assert result.pred_keypoint_heatmaps.abs().max() > 1e4
    keypoints = result.pred_keypoints
    assert keypoints.shape == (8, 4, 3) and torch.isfinite(keypoints).all()
    assert (
        (keypoints[..., 0] >= boxes[:, None, 0]) & (keypoints[..., 0] <= boxes[:, None, 2] + 1)
    ).all()
