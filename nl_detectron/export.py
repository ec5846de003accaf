"""Whole-model export of detectors with non-local blocks, through ``detectron2.export``:
TorchScript by tracing (``TracingAdapter``) or by scripting (``scripting_with_instances``), and
ONNX by tracing.

Exported models compute what ``GeneralizedRCNN.inference(..., do_postprocess=False)`` computes:
detections in the coordinates of the resized input image (:func:`postprocess` scales them to the
original image, as Detectron2's own deployment example does). Tracing runs inside
:func:`nl_detectron.layers.export_mode`, so the non-local blocks are recorded as matrix products
valid at every input size.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from .compat import HAS_CPP_EXTENSION
from .errors import UserInputError
from .layers import export_mode

__all__ = [
    "EXPORT_METHODS",
    "compare_with_eager",
    "ONNX_OPSET",
    "detectron2_export",
    "export_onnx",
    "export_scripting",
    "export_tracing",
    "onnx_instances",
    "postprocess",
    "traced_instances",
]

EXPORT_METHODS = ("tracing", "scripting")
# Opset 17: what the exporter of the pinned torch targets well; above Detectron2's 11, which
# predates the ops of the models' attention (nl_detectron exports no fused attention anyway).
ONNX_OPSET = 17


def detectron2_export() -> Any:
    """``detectron2.export``, or a clear error where this Detectron2 cannot import it."""
    try:
        import detectron2.export as d2_export
    except ImportError as e:  # v0.6 imports caffe2 at the top of detectron2.export
        raise UserInputError(
            f"This Detectron2 cannot import detectron2.export ({e}). Detectron2 main guards its "
            "caffe2 import and exports on any machine: build it from source (README, 'Support "
            "matrix'), e.g. `DETECTRON2_SOURCE=/path/to/detectron2 make env`."
            + ("" if HAS_CPP_EXTENSION else " (nl_detectron's `make` patches the registry build.)")
        ) from None
    return d2_export


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, GeneralizedRCNN):
        raise UserInputError(
            f"Export supports GeneralizedRCNN models (Mask / Keypoint R-CNN); got "
            f"{type(model).__name__}."
        )


def _inference(model: GeneralizedRCNN, inputs: list[dict[str, Tensor]]) -> list[dict[str, Any]]:
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def export_tracing(model: GeneralizedRCNN, image: Tensor) -> tuple[torch.jit.ScriptModule, Any]:
    """``model`` traced on ``image`` (``(3, H, W)``, resized as the model's test input).

    Returns the TorchScript module, whose input is an image and whose outputs are the flattened
    fields of the detections, and the ``TracingAdapter`` whose ``outputs_schema`` rebuilds the
    ``Instances`` (see :func:`traced_instances`).
    """
    _check_model(model)
    adapter = detectron2_export().TracingAdapter(model, [{"image": image}], _inference).eval()
    with export_mode(model), torch.no_grad():
        traced = torch.jit.trace(adapter, (image,))
    return traced, adapter


def traced_instances(traced: Any, adapter: Any, image: Tensor) -> Instances:
    """The detections of a traced model (or an ONNX session's outputs wrapped by
    :func:`onnx_instances`) on ``image``."""
    return adapter.outputs_schema(traced(image))[0]["instances"]


_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": Tensor,
    "pred_boxes": Boxes,
    "scores": Tensor,
    "pred_classes": Tensor,
    "pred_masks": Tensor,
    "pred_keypoints": Tensor,
    "pred_keypoint_heatmaps": Tensor,
}


class _ScriptableAdapter(nn.Module):
    """The model's inference returning the detections' fields as dicts (deployable)."""

    def __init__(self, model: GeneralizedRCNN) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: tuple[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]


def export_scripting(model: GeneralizedRCNN) -> torch.jit.ScriptModule:
    """``model`` scripted with ``scripting_with_instances``; its input is a tuple of
    ``{"image": (3, H, W)}`` dicts, its output a list of dicts of the detections' fields."""
    _check_model(model)
    from .modeling import NonLocalFPN

    if any(isinstance(m, NonLocalFPN) for m in model.modules()):
        raise UserInputError(
            "Scripting does not support NL blocks on FPN levels (MODEL.NONLOCAL.FPN_POSITIONS): "
            "export this model by tracing (--export-method tracing)."
        )
    return detectron2_export().scripting_with_instances(_ScriptableAdapter(model), _FIELDS)


def export_onnx(model: GeneralizedRCNN, image: Tensor, path: str) -> Any:
    """``model`` traced on ``image`` into the ONNX file ``path``, with the image's height and
    width dynamic; returns the ``TracingAdapter`` (its ``outputs_schema`` rebuilds the
    detections from the ONNX outputs).

    Raises:
        UserInputError: for a keypoint head: Detectron2's keypoint decoding
            (``heatmaps_to_keypoints``) does not export to ONNX; export such a model to
            TorchScript.
    """
    _check_model(model)
    if getattr(model.roi_heads, "keypoint_on", False):
        raise UserInputError(
            "ONNX export does not support keypoint heads: Detectron2's keypoint decoding "
            "(heatmaps_to_keypoints) uses indexing the ONNX exporter cannot record. Export this "
            "model to TorchScript (--format torchscript), or set MODEL.KEYPOINT_ON False."
        )
    adapter = detectron2_export().TracingAdapter(model, [{"image": image}], _inference).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter, deliberately: Detectron2's TracingAdapter (structures
        # flattened to tensors) is made for it, not for torch.export.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
        )
        torch.onnx.export(
            adapter,
            (image,),
            path,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            dynamic_axes={"image": {1: "height", 2: "width"}},
            dynamo=False,
        )
    return adapter


def onnx_instances(session: Any, adapter: Any, image: Tensor) -> Instances:
    """The detections of an onnxruntime ``session`` on ``image``."""
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    return adapter.outputs_schema([torch.as_tensor(o) for o in outputs])[0]["instances"]


def compare_with_eager(
    exported: Instances | dict[str, Any], model: GeneralizedRCNN, image: Tensor
) -> dict[str, float]:
    """The largest absolute difference, per field, between an exported model's detections on
    ``image`` and the eager model's (``inf`` when the number of detections differs)."""
    with torch.no_grad():
        eager = model.inference([{"image": image}], do_postprocess=False)[0]
    fields = exported.get_fields() if isinstance(exported, Instances) else exported
    differences = {}
    for name, want in eager.get_fields().items():
        got = fields[name]
        got = got.tensor if isinstance(got, Boxes) else got
        want = want.tensor if isinstance(want, Boxes) else want
        if got.shape != want.shape:
            differences[name] = float("inf")
        else:
            delta = (got.detach().double() - want.double()).abs()
            differences[name] = float(delta.max()) if delta.numel() else 0.0
    return differences


def postprocess(instances: Instances, height: int, width: int) -> Instances:
    """Detections of an exported model scaled to the original image (``height`` x ``width``),
    masks pasted: what the eager model returns with ``do_postprocess=True``."""
    return detector_postprocess(instances, height, width)
