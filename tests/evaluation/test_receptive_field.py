"""The context data's guarantee (nl_detectron.data.context): no cue pixel is inside the receptive
field of the context baseline's category scores, for a box of up to twice a disc's size around
it, so only a block with a larger reach (the NL model's) can read the cue. The zero gradients
are structural, not rounding: the check is the same on every CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_runs import REPO

from nl_detectron.config import load_config
from nl_detectron.data.context import IMAGE_SIZE, MIN_CUE_DISTANCE, cue_mask, render_context_image
from nl_detectron.engine import Trainer
from nl_detectron.evaluation.receptive_field import (
    chebyshev_reach,
    class_score_reach,
    pixels_reaching_scores,
    square_boxes,
)
from nl_detectron.layers import non_local_blocks

CONFIGS = REPO / "configs" / "context"
BOX_SLACK = 2.0  # boxes of twice a disc's diameter: far looser than a foreground proposal


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # random weights: every path of the architecture carries gradient
    return Trainer.build_model(load_config(str(CONFIGS / name), ["MODEL.DEVICE", "cpu"]))


def _image(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels[:, :, ::-1].copy()).permute(2, 0, 1).float()  # BGR


def test_chebyshev_reach_of_a_mask():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    assert chebyshev_reach(mask, (5.0, 5.0)) == 0.0
    mask[2, 8] = True  # pixel centre (8.5, 2.5)
    assert chebyshev_reach(mask, (5.0, 5.0)) == pytest.approx(3.5)


@pytest.mark.parametrize("variant", ["image", "pair"])
def test_the_baseline_cannot_see_any_cue(variant):
    model = _model("mask_rcnn_baseline_context.yaml")
    rng = np.random.default_rng(11)
    reaches = []
    for _ in range(3):
        pixels, layout = render_context_image(rng, variant)
        discs = layout["discs"]
        boxes = square_boxes([d["center"] for d in discs], [BOX_SLACK * d["radius"] for d in discs])
        masks = pixels_reaching_scores(model, _image(pixels), boxes)
        cue = torch.from_numpy(cue_mask(layout))
        for mask, disc in zip(masks, discs):
            assert mask.any()  # the box reads its own pixels
            assert not (mask & cue).any()  # and none of any cue
            reaches.append(chebyshev_reach(mask, disc["center"]))
    assert max(reaches) < MIN_CUE_DISTANCE


def test_an_open_non_local_block_reaches_every_cue():
    # The NL model with its gate opened: its category scores read the whole image, cues included.
    model = _model("mask_rcnn_nl_context.yaml")
    for _, block in non_local_blocks(model):
        torch.nn.init.constant_(block.out_norm.weight, 1.0)
    pixels, layout = render_context_image(np.random.default_rng(11), "pair")
    discs = layout["discs"]
    centers = [tuple(d["center"]) for d in discs]
    reaches = class_score_reach(model, _image(pixels), centers, [d["radius"] for d in discs])
    for (x, y), reach in zip(centers, reaches):
        corner = max(x, y, IMAGE_SIZE - x, IMAGE_SIZE - y) - 0.5  # the farthest pixel centre
        assert reach == pytest.approx(corner, abs=1e-6)
