"""Attention maps of NL blocks (nl_detectron.visualization.attention) and
tools/visualize_attention.py."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from viz_helpers import (  # noqa: F401
    KEYPOINT_NAMES,
    PAIRWISE,
    load_tool,
    one_hot_block,
    png_size,
    tiny_cfg,
    write_metrics,
)

from nl_detectron.errors import UserInputError
from nl_detectron.visualization import (
    Predictor,
    QueryPoint,
    compute_attention_maps,
    draw_attention_maps,
)
from nl_detectron.visualization.attention import heat_map, image_block_attention


@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_attention_peaks_at_the_matching_distant_position(pairwise: str, sub_sample: bool):
    # An 8 x 8 feature map of stride 16 for a 128 x 128 resized image, from a 256 x 256 image.
    query_cell, match_cell = (1, 1), (6, 5)
    x = torch.zeros(1, 4, 8, 8)
    x[0, 0][query_cell] = 1
    x[0, 0 if pairwise == "gaussian" else 1][match_cell] = 1
    block = one_hot_block(pairwise, sub_sample)
    # Pixel (48, 48) of the original image is (24, 24) resized, in feature cell (1, 1).
    (amap,) = image_block_attention(
        "block",
        block,
        x,
        [QueryPoint(48.0, 48.0)],
        image_size=(256, 256),
        resized_size=(128, 128),
        padded_size=(128, 128),
    )
    assert amap.query_cell == query_cell
    pool = 2 if sub_sample else 1
    assert amap.weights.shape == (8 // pool, 8 // pool)
    assert amap.extent == (0.0, 256.0, 256.0, 0.0)
    key = (match_cell[0] // pool, match_cell[1] // pool)
    weights = amap.weights
    m = weights.size
    if pairwise == "embedded_gaussian":
        assert np.unravel_index(weights.argmax(), weights.shape) == key
        assert weights[key] > 0.99
    elif pairwise == "gaussian":  # equal features at the query and the match: half each
        own = (query_cell[0] // pool, query_cell[1] // pool)
        assert weights[key] == pytest.approx(0.5, abs=1e-3)
        assert weights[own] == pytest.approx(0.5, abs=1e-3)
    else:  # f / M: 1 / M at the match, 0 elsewhere
        expected = np.zeros_like(weights)
        expected[key] = 1 / m
        np.testing.assert_allclose(weights, expected, atol=1e-7)


def test_heat_map_opacity():
    uniform, peaked = np.full((2, 3), 1 / 6), np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.5]])
    # From 0: a uniform map covers everything at full opacity; a peak stands out.
    np.testing.assert_allclose(heat_map(uniform, 0.7)[..., 3], 0.7)
    np.testing.assert_allclose(heat_map(peaked, 0.7)[..., 3], 0.7 * peaked / 0.5)
    # Stretched: from the lowest value, which becomes transparent.
    np.testing.assert_allclose(
        heat_map(peaked, 0.7, stretch=True)[..., 3], [[0, 0, 0], [0, 0, 0.7]], atol=1e-12
    )
    # Negative values (dot product): from the lowest.
    np.testing.assert_allclose(heat_map(np.array([[-1.0, 1.0]]), 1.0)[..., 3], [[0, 1]])


def test_attention_query_outside_the_image_is_refused(image: np.ndarray):
    predictor = Predictor(tiny_cfg(pairwise="embedded_gaussian"))
    with pytest.raises(UserInputError, match=r"\(140, 10\) is outside the image.*140 x 100"):
        compute_attention_maps(predictor, image, [(140, 10)])


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_attention_maps_of_backbone_and_head_blocks(pairwise: str, image: np.ndarray, tmp_path):
    torch.manual_seed(0)
    predictor = Predictor(tiny_cfg(pairwise=pairwise))
    # The default queries: the centres of the top-scoring detections.
    default = compute_attention_maps(predictor, image, top_k=2)
    backbone = "backbone.bottom_up.res4.non_local_before_5"
    head = "roi_heads.keypoint_head.non_local_after_conv_fcn2"
    assert [row[0].block_name for row in default.maps] == [backbone, head]
    assert [q.detection for q in default.queries] == [0, 1]  # detections sorted by score
    # User points: the head block uses the best detection whose box contains the point.
    boxes = default.detections.boxes
    points = [(80.0, 50.0), (float(boxes[1, 0]) + 0.5, float(boxes[1, 1]) + 0.5)]
    user = compute_attention_maps(predictor, image, points)
    for (x, y), amap in zip(points, user.maps[1]):
        inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
        if not inside.any():
            assert amap.weights is None and amap.note == "no detection box contains this point"
        else:
            assert amap.roi_box == pytest.approx(tuple(boxes[inside.argmax()]))
    for row in user.maps + default.maps:
        for amap in row:
            if amap.weights is None:
                continue
            assert np.isfinite(amap.weights).all()
            if pairwise in ("embedded_gaussian", "gaussian"):
                assert amap.weights.sum() == pytest.approx(1.0, abs=1e-5)
    # Backbone: the 100 x 140 image is resized to 64 x 90 and padded to 64 x 96 (FPN: 32);
    # res4 (stride 16) is 4 x 6, pooled to 2 x 3 key cells of 32 x 32 resized pixels.
    amap = user.maps[0][0]
    assert amap.weights.shape == (2, 3)
    assert amap.query_cell == (int(50 * 64 / 100 // 16), int(80 * 90 / 140 // 16))
    np.testing.assert_allclose(amap.extent, (0, 3 * 32 * 140 / 90, 2 * 32 * 100 / 64, 0))
    # Head: the 14 x 14 RoI features pooled to 7 x 7 over the box of the query's detection.
    amap = default.maps[1][0]
    box = default.detections.boxes[0]
    assert amap.weights.shape == (7, 7)
    assert amap.roi_box == pytest.approx(tuple(box))
    assert amap.extent == pytest.approx((box[0], box[2], box[3], box[1]))

    path = draw_attention_maps(default, tmp_path / "attention.png", panel_size=200)
    assert png_size(path) == (2 * 200, 2 * 200)


def test_attention_without_detections(image: np.ndarray, caplog):
    caplog.set_level(logging.INFO, logger="nl_detectron.visualization")
    cfg = tiny_cfg(pairwise="concatenation")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 1.0  # nothing passes
    result = compute_attention_maps(Predictor(cfg), image)
    # The query falls back to the image centre; the head block has no RoIs and is skipped.
    assert result.queries == [QueryPoint(70.0, 50.0)]
    assert [row[0].block_name for row in result.maps] == [
        "backbone.bottom_up.res4.non_local_before_5"
    ]
    assert "non_local_after_conv_fcn2: no detections, so no RoIs" in caplog.text


def test_attention_tool(shapes_dataset: str, tmp_path):
    config = tmp_path / "nl.yaml"
    config.write_text(tiny_cfg(pairwise="embedded_gaussian").dump())
    out = tmp_path / "attention.png"
    argv = ["--config-file", str(config), "--dataset", shapes_dataset, "--index", "1"]
    load_tool("visualize_attention").main(
        argv
        + ["--query", "10,20", "--query", "50.5,40", "--panel-size", "160"]
        + ["--block", "backbone.bottom_up.res4.non_local_before_5", "--output", str(out)]
    )
    # One block (rows) x two query points (columns).
    assert png_size(out) == (2 * 160, 160)


def test_attention_tool_refuses_a_model_without_non_local_blocks(tmp_path, capsys):
    config = tmp_path / "vanilla.yaml"
    config.write_text(tiny_cfg().dump())
    image_path = tmp_path / "image.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image_path)
    tool = load_tool("visualize_attention")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--config-file", str(config), "--input", str(image_path), "--output", "x.png"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{config} has no non-local blocks" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, opts, message",
    [
        ({"--config-file": "missing.yaml"}, [], "Config file 'missing.yaml' not found"),
        ({"--weights": "missing.pth"}, [], "Checkpoint 'missing.pth' does not exist"),
        ({"--input": "missing.png"}, [], "Image file 'missing.png' does not exist"),
        ({"--dataset": "nope"}, [], "Dataset 'nope' is not registered"),
        ({"--query": "1;2"}, [], "query point '1;2' should be x,y"),
        ({}, ["MODEL.NONLOCAL.PAIRWIZE", "dot_product"], "Did you mean MODEL.NONLOCAL.PAIRWISE"),
    ],
)
def test_attention_tool_input_errors(
    flags: dict[str, str], opts: list[str], message: str, tmp_path, capsys
):
    config = tmp_path / "vanilla.yaml"
    config.write_text(tiny_cfg().dump())
    image_path = tmp_path / "image.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image_path)
    args = {"--config-file": str(config), "--output": "x.png"}
    args.update(flags)
    if "--dataset" not in flags:
        args["--input"] = flags.get("--input", str(image_path))
    argv = [item for pair in args.items() for item in pair] + opts
    with pytest.raises(SystemExit) as exit_info:
        load_tool("visualize_attention").main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------
# Predictions beside ground truth
