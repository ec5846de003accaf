"""Which input pixels can change a detector's category scores for a box: the receptive field of
the box head's classification, measured by gradient.

A pixel outside it has an exactly zero gradient for every class score of the box, whatever the
weights (no rounding is involved: the zeros are structural). So a cue outside it cannot decide
the category, and a detector that must read such a cue can only do it through something with a
larger reach, a non-local block. The context data (:mod:`nl_detectron.data.context`) places
every cue farther from its object than the context baseline reaches; the tests and the context
benchmark check that here.
"""

from __future__ import annotations

import torch
from detectron2.structures import Boxes
from torch import nn

__all__ = ["chebyshev_reach", "class_score_reach", "pixels_reaching_scores", "square_boxes"]


def pixels_reaching_scores(
    model: nn.Module, image: torch.Tensor, boxes: torch.Tensor
) -> torch.Tensor:
    """``(N, H, W)`` boolean: the input pixels whose gradient on any class score (foreground
    classes and background) of box ``n`` is not zero.

    Args:
        model: a ``GeneralizedRCNN`` with ``StandardROIHeads`` (box pooler, box head, box
            predictor); used in eval mode (BN with its running statistics), restored after.
        image: ``(3, H, W)`` in the model's input format (``INPUT.FORMAT``, 0-255).
        boxes: ``(N, 4)`` XYXY boxes in image pixels, e.g. ground-truth boxes enlarged by what a
            proposal may differ from them.
    """
    was_training = model.training
    model.eval()
    try:
        x = ((image.to(model.pixel_mean) - model.pixel_mean) / model.pixel_std)[None]
        x.requires_grad_(True)
        features = model.backbone(x)
        heads = model.roi_heads
        pooled = heads.box_pooler(
            [features[f] for f in heads.box_in_features], [Boxes(boxes.to(x))]
        )
        scores, _ = heads.box_predictor(heads.box_head(pooled))
        reach = torch.zeros((len(boxes), *image.shape[1:]), dtype=torch.bool)
        for n in range(len(boxes)):
            for k in range(scores.shape[1]):
                (grad,) = torch.autograd.grad(scores[n, k], x, retain_graph=True)
                reach[n] |= grad[0].abs().sum(dim=0) != 0
        return reach
    finally:
        model.train(was_training)


def chebyshev_reach(reach: torch.Tensor, center: tuple[float, float]) -> float:
    """The largest Chebyshev distance ``max(|dx|, |dy|)`` from ``center`` (x, y) to a pixel
    (its centre) of the ``(H, W)`` mask ``reach``; 0 for an empty mask."""
    ys, xs = torch.nonzero(reach, as_tuple=True)
    if len(xs) == 0:
        return 0.0
    dx = (xs.double() + 0.5 - center[0]).abs()
    dy = (ys.double() + 0.5 - center[1]).abs()
    return float(torch.maximum(dx, dy).max())


def square_boxes(centers: list[tuple[float, float]], half_sizes: list[float]) -> torch.Tensor:
    """``(N, 4)`` XYXY boxes: the square of half side ``half_sizes[i]`` around ``centers[i]``."""
    return torch.tensor(
        [[x - h, y - h, x + h, y + h] for (x, y), h in zip(centers, half_sizes)],
        dtype=torch.float32,
    )


def class_score_reach(
    model: nn.Module,
    image: torch.Tensor,
    centers: list[tuple[float, float]],
    half_sizes: list[float],
) -> list[float]:
    """For each object centre, how far (Chebyshev, px) from it the category scores of the
    square box of half side ``half_sizes[i]`` around it read the image:
    :func:`pixels_reaching_scores` summarised by :func:`chebyshev_reach`."""
    masks = pixels_reaching_scores(model, image, square_boxes(centers, half_sizes))
    return [chebyshev_reach(mask, center) for mask, center in zip(masks, centers)]
