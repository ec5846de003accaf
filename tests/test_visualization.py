"""Tests of the visualisation tools: attention maps, predictions beside ground truth, curves."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from nl_detectron.config import add_nonlocal_config
from nl_detectron.errors import UserInputError
from nl_detectron.layers import NonLocalBlock
from nl_detectron.visualization import (
    Predictor,
    QueryPoint,
    compute_attention_maps,
    draw_attention_maps,
    load_metrics,
    visualize_predictions,
)
from nl_detectron.visualization.attention import heat_map, image_block_attention

TOOLS = Path(__file__).resolve().parent.parent / "tools"
PAIRWISE = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
KEYPOINT_NAMES = ("top", "bottom", "left", "right")


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, checking that it is not a single flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 1.0, f"{path} is blank"
        return image.size


# ------------------------------------------------------------------------------------------
# A tiny COCO-format dataset and a tiny Mask + Keypoint R-CNN with random weights.


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> str:
    """Registers ``viz_test_shapes``: 3 images of 80 x 96 pixels, squares with 4 keypoints."""
    name = "viz_test_shapes"
    if name in DatasetCatalog.list():
        return name
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(3):
        pixels = (rng.random((80, 96, 3)) * 60).astype(np.uint8)
        x0, y0, side = 10 + 20 * image_id, 12 + 8 * image_id, 30
        pixels[y0 : y0 + side, x0 : x0 + side] = (220, 180, 40)
        Image.fromarray(pixels).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 96, "height": 80})
        cx, cy = x0 + side / 2, y0 + side / 2
        keypoints = [cx, y0, 2, cx, y0 + side, 2, x0, cy, 2, x0 + side, cy, 2]
        polygon = [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]
        annotations.append(
            {
                "id": image_id + 1,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [x0, y0, side, side],
                "area": side * side,
                "iscrowd": 0,
                "segmentation": [polygon],
                "keypoints": keypoints,
                "num_keypoints": 4,
            }
        )
    categories = [{"id": 1, "name": "square", "keypoints": list(KEYPOINT_NAMES), "skeleton": []}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(coco))
    register_coco_instances(
        name,
        {
            "keypoint_names": KEYPOINT_NAMES,
            "keypoint_flip_map": (("left", "right"),),
            "keypoint_connection_rules": [
                ("top", "left", (255, 0, 0)),
                ("left", "bottom", (0, 255, 0)),
                ("bottom", "right", (0, 0, 255)),
            ],
        },
        str(root / "instances.json"),
        str(root),
    )
    return name


def tiny_cfg(dataset: str = "", *, pairwise: str = "") -> CfgNode:
    """A Mask + Keypoint R-CNN R50-FPN with tiny widths; random weights; keeps every detection.

    With ``pairwise``, the NL backbone (one block before the last res4 block) and the NL
    keypoint head (one block after its 2nd conv), with that pairwise function.
    """
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.KEYPOINT_ON = True
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(KEYPOINT_NAMES)
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = [32] * 4
    cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = []
    cfg.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = []
    if pairwise:
        cfg.MODEL.BACKBONE.NAME = "build_non_local_resnet_fpn_backbone"
        cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
        cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:-1"]
        cfg.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = [2]
        cfg.MODEL.NONLOCAL.PAIRWISE = pairwise
        cfg.MODEL.NONLOCAL.NORM = "BN"
    cfg.TEST.DETECTIONS_PER_IMAGE = 4
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATASETS.TEST = (dataset,) if dataset else ()
    return cfg


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 100 x 140 RGB image with a bright square."""
    rng = np.random.default_rng(1)
    pixels = (rng.random((100, 140, 3)) * 80).astype(np.uint8)
    pixels[30:70, 60:110] = (240, 200, 60)
    return pixels


# ------------------------------------------------------------------------------------------
# Attention maps


def one_hot_block(pairwise: str, sub_sample: bool) -> NonLocalBlock:
    """A block whose query at a feature equal to e0 matches only keys equal to e1.

    theta maps channel 0 to inner channel 0, phi maps channel 1 to inner channel 0, w_f (of the
    concatenation) reads phi only, and the softmax scale is large; the Gaussian form, which has
    no embeddings, matches equal features instead.
    """
    block = NonLocalBlock(4, pairwise=pairwise, inner_channels=2, sub_sample=sub_sample, scale=50)
    with torch.no_grad():
        if block.theta is not None:
            block.theta.weight.zero_()
            block.theta.weight[0, 0] = 1
            block.phi.weight.zero_()
            block.phi.weight[0, 1] = 1
        if block.concat_project is not None:
            block.concat_project.weight.zero_()
            block.concat_project.weight[0, 2] = 1  # inner channel 0 of phi
    return block.eval()


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


def test_predictor_reports_blocks_the_checkpoint_lacks(tmp_path, caplog, image: np.ndarray):
    torch.manual_seed(0)
    vanilla, nl = Predictor(tiny_cfg()), Predictor(tiny_cfg(pairwise="dot_product"))
    torch.save({"model": vanilla.model.state_dict()}, tmp_path / "vanilla.pth")
    torch.save({"model": nl.model.state_dict()}, tmp_path / "nl.pth")
    cfg = tiny_cfg(pairwise="dot_product")
    cfg.MODEL.WEIGHTS = str(tmp_path / "nl.pth")
    assert Predictor(cfg).blocks_without_weights == []
    cfg.MODEL.WEIGHTS = str(tmp_path / "vanilla.pth")
    predictor = Predictor(cfg)
    assert predictor.blocks_without_weights == [
        "backbone.bottom_up.res4.non_local_before_5",
        "roi_heads.keypoint_head.non_local_after_conv_fcn2",
    ]
    compute_attention_maps(predictor, image, [(5, 5)])
    assert "non_local_before_5 has no weights in" in caplog.text


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


def test_prediction_visualiser_on_a_coco_dataset(shapes_dataset: str, tmp_path):
    torch.manual_seed(0)
    predictor = Predictor(tiny_cfg(shapes_dataset))
    paths = visualize_predictions(
        predictor, shapes_dataset, tmp_path, num_images=2, score_threshold=0.0
    )
    assert [p.name for p in paths] == [f"{shapes_dataset}_0000.png", f"{shapes_dataset}_0001.png"]
    for path in paths:
        # Ground truth and prediction of a 96 x 80 image side by side, 8 pixels apart, under
        # a 20-pixel caption.
        assert png_size(path) == (2 * 96 + 8, 80 + 20)
    # The ground truth side has the drawn annotation: it differs from the raw image.
    drawn = np.asarray(Image.open(paths[0]).convert("RGB"))[20:, :96].astype(int)
    raw = np.asarray(Image.open(Path(DatasetCatalog.get(shapes_dataset)[0]["file_name"])))
    assert np.abs(drawn - raw).mean() > 1.0
    assert MetadataCatalog.get(shapes_dataset).thing_classes == ["square"]


def test_prediction_tool(shapes_dataset: str, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg(shapes_dataset).dump())
    load_tool("visualize_predictions").main(
        [
            "--config-file",
            str(config),
            "--indices",
            "2",
            "--scale",
            "2",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert png_size(tmp_path / "out" / f"{shapes_dataset}_0002.png") == (2 * 192 + 8, 160 + 20)


def test_prediction_tool_unknown_dataset(shapes_dataset: str, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg(shapes_dataset).dump())
    with pytest.raises(SystemExit) as exit_info:
        load_tool("visualize_predictions").main(
            ["--config-file", str(config), "--dataset", "nope", "--output", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Dataset 'nope' is not registered" in err and shapes_dataset in err


# ------------------------------------------------------------------------------------------
# Curves


def write_metrics(path: Path, losses: dict[str, float], ap: float, resumed: bool = False) -> Path:
    """A detectron2-style metrics.json: losses every 20 iterations, evaluations every 100."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for iteration in range(19, 300, 20):
        record = {"iteration": iteration, "lr": 0.01, "time": 0.5}
        decay = math.exp(-iteration / 200)
        record.update({key: value * decay for key, value in losses.items()})
        record["total_loss"] = sum(value * decay for value in losses.values())
        lines.append(record)
        if (iteration + 1) % 100 == 0:
            lines.append({"iteration": iteration, "bbox/AP": ap * iteration / 300, "segm/AP": ap})
    if resumed:  # a resumed run appends the iterations after its last checkpoint again
        lines += [{"iteration": 279, "total_loss": 0.123}]
    text = "\n".join(json.dumps(line) for line in lines)
    (path / "metrics.json").write_text(text + '\n{"iteration": 300, "total_l')  # still writing
    return path


def test_load_metrics(tmp_path):
    run = load_metrics(write_metrics(tmp_path / "nl", {"loss_cls": 1.0}, 30.0, resumed=True))
    assert run.label == "nl"
    assert run.loss_keys() == ["total_loss", "loss_cls"]
    assert dict(run.scalars["total_loss"])[279] == 0.123  # the later line wins
    assert [it for it, _ in run.scalars["bbox/AP"]] == [99, 199, 299]
    assert run.scalars["segm/AP"][0] == (99, 30.0)
    assert "keypoints/AP" not in run.scalars


def test_plot_metrics_two_runs(tmp_path):
    baseline = write_metrics(tmp_path / "baseline", {"loss_cls": 1.0, "loss_mask": 0.7}, 30.0)
    nl = write_metrics(tmp_path / "nl", {"loss_cls": 0.9, "loss_box_reg": 0.5}, 33.0)
    out = tmp_path / "curves.png"
    load_tool("plot_metrics").main([str(baseline), f"NL={nl}", "--output", str(out)])
    # total_loss, loss_box_reg, loss_cls, loss_mask, bbox/AP, segm/AP: 3 columns, 2 rows.
    assert png_size(out) == (3 * 420, 2 * 300 + 30)


def test_plot_metrics_errors(tmp_path, capsys):
    tool = load_tool("plot_metrics")
    run = write_metrics(tmp_path / "run", {"loss_cls": 1.0}, 30.0)
    for argv, message in [
        ([str(tmp_path / "nowhere")], "nowhere' does not exist"),
        ([str(tmp_path)], f"Run folder '{tmp_path}' has no metrics.json"),
        ([str(run), str(run)], "Several runs are labelled run; name them with LABEL=PATH"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv + ["--output", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Demo figures


def test_demo_figures(shapes_dataset: str, tmp_path):
    run, baseline = tmp_path / "nl", tmp_path / "baseline"
    cfg = tiny_cfg(shapes_dataset, pairwise="embedded_gaussian")
    write_metrics(run, {"loss_cls": 0.9, "loss_keypoint": 3.0}, 33.0)
    write_metrics(baseline, {"loss_cls": 1.0, "loss_keypoint": 3.2}, 30.0)
    (run / "config.yaml").write_text(cfg.dump())
    torch.save({"model": Predictor(cfg).model.state_dict()}, run / "model_final.pth")
    out = tmp_path / "figures"
    load_tool("demo_figures").main([str(run), "--baseline", str(baseline), "--output", str(out)])
    # 3 queries x 2 blocks of 240-pixel panels; 3 images of 96 x 80 drawn at scale 2 beside
    # their ground truth; total_loss, loss_cls, loss_keypoint, bbox/AP, segm/AP in 3 columns.
    expected = {
        "attention_map.png": (3 * 240, 2 * 240),
        "predictions.png": (2 * 192 + 8, 3 * (160 + 20) + 2 * 8),
        "training_curves.png": (3 * 420, 2 * 300 + 30),
    }
    for name, size in expected.items():
        assert png_size(out / name) == size
        assert (out / name).stat().st_size < 300_000


def test_demo_figures_need_a_finished_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("demo_figures").main([str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'config.yaml'} does not exist" in capsys.readouterr().err
