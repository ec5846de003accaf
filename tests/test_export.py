"""Whole-model export of NL detectors (nl_detectron.export, tools/export_model.py): TorchScript by
tracing and by scripting, ONNX run with onnxruntime; the exported model gives the eager model's
detections on an image of another size than the one traced with."""

from __future__ import annotations

import pytest
import torch
from training_runs import REPO, train_net

from nl_detectron import export
from nl_detectron.config import load_config
from nl_detectron.engine import Trainer
from nl_detectron.errors import UserInputError
from nl_detectron.layers import export_mode

QUICKSTART = REPO / "configs" / "quickstart" / "mask_rcnn_nl_shapes.yaml"
# Exported and eager models run the same operations, in float32, the exported one over the whole
# pairwise map where the eager one may take it in blocks: equal to a few float32 units.
TOLERANCE = {
    "pred_boxes": 1e-3,  # pixels of a ~150-pixel image
    "scores": 1e-5,
    "pred_classes": 0.0,
    "pred_masks": 1e-4,
    "pred_keypoints": 1e-3,
    "pred_keypoint_heatmaps": 1e-3,
}


def _model(keypoints: bool = True, chunk_elements: int | None = None) -> torch.nn.Module:
    """The quickstart NL model with random weights whose NL blocks contribute (gamma 1) and
    every detection kept (score threshold 0)."""
    cfg = load_config(str(QUICKSTART), ["MODEL.KEYPOINT_ON", str(keypoints)])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    for name, module in model.named_modules():
        if name.endswith("out_norm"):
            torch.nn.init.ones_(module.weight)
        if chunk_elements is not None and hasattr(module, "chunk_elements"):
            module.chunk_elements = chunk_elements
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    return model


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def _assert_matches_eager(exported, model, image) -> None:
    differences = export.compare_with_eager(exported, model, image)
    assert set(differences) >= {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    for name, difference in differences.items():
        assert difference <= TOLERANCE[name], (name, difference)


@pytest.mark.parametrize("keypoints", [False, True], ids=["mask", "mask+keypoints"])
def test_traced_model_matches_eager_at_another_size(keypoints):
    model = _model(keypoints)
    traced, adapter = export.export_tracing(model, _image(128, 160, 0))
    for image in (_image(128, 160, 1), _image(160, 128, 2)):
        _assert_matches_eager(export.traced_instances(traced, adapter, image), model, image)


def test_blocks_of_query_rows_trace_correctly_in_export_mode():
    # The eager CPU inference path computes the map in blocks of query rows; with 64 entries a
    # block it loops, and a trace would keep the traced size's loop count.
    model = _model(keypoints=False, chunk_elements=64)
    traced, adapter = export.export_tracing(model, _image(160, 192, 0))
    image = _image(224, 160, 3)
    _assert_matches_eager(export.traced_instances(traced, adapter, image), model, image)


def test_tracing_outside_export_mode_records_fused_attention():
    # Without export mode a trace takes the fused kernel (as in training), not the blocks of
    # query rows whose loop count would be the traced size's: also right at another size.
    model = _model(keypoints=False, chunk_elements=64)
    adapter = (
        export.detectron2_export()
        .TracingAdapter(model, [{"image": _image(160, 192, 0)}], export._inference)
        .eval()
    )
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (_image(160, 192, 0),))
    assert "scaled_dot_product_attention" in str(traced.inlined_graph)
    image = _image(224, 160, 3)
    _assert_matches_eager(export.traced_instances(traced, adapter, image), model, image)
    with export_mode(model):
        assert all(u.export for u in model.modules() if hasattr(u, "export"))
    assert not any(u.export for u in model.modules() if hasattr(u, "export"))  # restored


def test_scripted_model_matches_eager():
    model = _model(keypoints=True)
    scripted = export.export_scripting(model)
    image = _image(160, 128, 4)
    _assert_matches_eager(scripted(({"image": image},))[0], model, image)


def test_onnx_model_matches_eager_at_another_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _model(keypoints=False)
    adapter = export.export_onnx(model, _image(128, 160, 0), str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    image = _image(160, 128, 5)
    _assert_matches_eager(export.onnx_instances(session, adapter, image), model, image)


def test_onnx_refuses_keypoint_heads_with_the_alternative(tmp_path):
    with pytest.raises(UserInputError, match=r"keypoint heads.*--format torchscript"):
        export.export_onnx(_model(keypoints=True), _image(128, 160, 0), str(tmp_path / "m.onnx"))


@pytest.mark.slow
def test_export_tool(tmp_path):
    tool = REPO / "tools" / "export_model.py"
    proc = train_net(
        "--config-file", str(QUICKSTART), "--output", str(tmp_path), "MODEL.WEIGHTS", "",
        config=None, script=tool,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model.ts").is_file()
    assert proc.stdout.count("Exported vs eager") == 2
    assert "warn" not in proc.stderr.lower(), proc.stderr[-2000:]
