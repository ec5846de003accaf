"""Keypoints from heatmap logits, whatever the logits: Detectron2's decoding without its overflow.

Detectron2's ``heatmaps_to_keypoints`` (``detectron2/structures/keypoints.py``) resizes each
RoI's ``(K, S, S)`` logits to the box by bicubic interpolation, takes the best pixel of each
keypoint, and scores it with a softmax over the box normalised by the ``S x S`` logits:
``exp(r_ij - r_max) / sum(exp(l - r_max))``. Bicubic interpolation overshoots at a steep edge;
where the resized maximum ``r_max`` exceeds every logit ``l`` by more than ~88, the float32 sum
underflows to 0, the scores become ``inf`` / ``nan`` and its bare ``assert`` on the argmax fails
(docs/upstream.md, #6): an unconverged model, or any model on an unlucky box, ends the evaluation
with a traceback. Here the best pixel and its score are computed directly: the score at the best
pixel is ``1 / sum(exp(l - r_max))``, exactly the number Detectron2 computes there; where that
sum underflows, the score saturates at the largest finite value of the dtype (``nan`` logits give
a score of 0). So the result equals Detectron2's wherever Detectron2's does not fail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.structures import Instances
from torch import Tensor

__all__ = ["heatmaps_to_keypoints", "keypoint_rcnn_inference"]


@torch.jit.script_if_tracing
def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> Tensor:
    """Keypoints of each RoI from its heatmap logits, as Detectron2's function of this name.

    Args:
        maps: ``(R, K, S, S)`` heatmap logits of R RoIs and K keypoints.
        rois: ``(R, 4)`` boxes ``(x0, y0, x1, y1)`` in image pixels.

    Returns:
        ``(R, K, 4)``: x and y in image pixels (pixel centres, ``d + 0.5``, as
        ``Keypoints.to_heatmap``), the logit at the best pixel, and its score (finite, >= 0).
    """
    maps, rois = maps.detach(), rois.detach()
    num_rois, num_keypoints = maps.shape[0], maps.shape[1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    # Whole pixels of the resized map -> the box's own width and height
    width_corrections, height_corrections = widths / widths_ceil, heights / heights_ceil
    keypoints = maps.new_zeros(num_rois, num_keypoints, 4)
    for i in range(num_rois):
        size = [int(heights_ceil[i]), int(widths_ceil[i])]
        # (1, K, S, S) -> (1, K, h, w) -> (K, h * w): the logits over the box's pixels
        resized = F.interpolate(maps[i : i + 1], size=size, mode="bicubic", align_corners=False)
        flat = resized.reshape(num_keypoints, -1)
        best = flat.argmax(1)
        # (K, h * w) -> (K): the best logit of each keypoint
        best_logit = flat.gather(1, best[:, None])[:, 0]
        # The softmax at the best pixel: exp(0) / sum(exp(l - r_max)) over the S x S logits
        normaliser = (maps[i] - best_logit[:, None, None]).exp().sum((1, 2))
        score = torch.nan_to_num(1.0 / normaliser, nan=0.0)
        x_int = best % size[1]
        y_int = (best - x_int) // size[1]
        keypoints[i, :, 0] = (x_int.float() + 0.5) * width_corrections[i] + rois[i, 0]
        keypoints[i, :, 1] = (y_int.float() + 0.5) * height_corrections[i] + rois[i, 1]
        keypoints[i, :, 2] = best_logit
        keypoints[i, :, 3] = score
    return keypoints


def keypoint_rcnn_inference(pred_keypoint_logits: Tensor, pred_instances: list[Instances]) -> None:
    """Detectron2's ``keypoint_rcnn_inference`` with :func:`heatmaps_to_keypoints`: sets
    ``pred_keypoints`` ``(R_i, K, 3)`` (x, y, score) and ``pred_keypoint_heatmaps``
    ``(R_i, K, S, S)`` (the logits) on each image's instances.

    Args:
        pred_keypoint_logits: ``(R, K, S, S)``, the RoIs of all images in order.
        pred_instances: the predicted instances of each image (``pred_boxes``), ``R_i`` each.
    """
    boxes = cat([instances.pred_boxes.tensor for instances in pred_instances], dim=0)
    logits = pred_keypoint_logits.detach()
    # (R, K, 4) -> (R, K, 3): x, y, score
    decoded = heatmaps_to_keypoints(logits, boxes.detach())[:, :, [0, 1, 3]]
    counts = [len(instances) for instances in pred_instances]
    for instances, keypoints, heatmaps in zip(
        pred_instances, decoded.split(counts, dim=0), logits.split(counts, dim=0)
    ):
        instances.pred_keypoints = keypoints
        instances.pred_keypoint_heatmaps = heatmaps
