#!/usr/bin/env python
"""Export a trained detector with non-local blocks for deployment, in the spirit of Detectron2's
``tools/deploy/export_model.py``: a config and weights in, TorchScript (tracing or scripting) or
ONNX (tracing) out, with the exported model checked against the eager one on a second image of
another size. E.g.:

    python tools/export_model.py --config-file configs/quickstart/mask_rcnn_nl_shapes.yaml \\
        --format torchscript --export-method tracing --output output/export \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python tools/export_model.py --config-file configs/quickstart/mask_rcnn_nl_shapes.yaml \\
        --format onnx --output output/export MODEL.WEIGHTS output/demo/model_final.pth \\
        MODEL.KEYPOINT_ON False

The exported model returns the detections in the coordinates of the resized input image (as
``GeneralizedRCNN.inference(..., do_postprocess=False)``); ``nl_detectron.export.postprocess``
scales them to the original image.
"""

import argparse
import os
import sys
import time
from typing import Optional

# First: nl_detectron imports Detectron2 without its known third-party warnings.
from nl_detectron.cli import run_tool

# isort: split
import torch
from detectron2.data import transforms as T

from nl_detectron.checkpoint import NonLocalCheckpointer
from nl_detectron.config import load_config
from nl_detectron.errors import UserInputError
from nl_detectron.visualization import dataset_record, read_rgb_image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's YAML config")
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--export-method", choices=["tracing", "scripting"], default="tracing")
    parser.add_argument("--output", required=True, help="directory for model.ts / model.onnx")
    parser.add_argument(
        "--sample-image", help="image to trace with (default: the first of DATASETS.TEST)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def _test_input(cfg, rgb) -> torch.Tensor:
    """An RGB image as the model's test input: resized, in its channel order, (3, H, W)."""
    image = rgb[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else rgb
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy())


def _run(args: argparse.Namespace) -> Optional[str]:
    from detectron2.modeling import build_model

    from nl_detectron import export

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    if args.format == "onnx" and args.export_method != "tracing":
        raise UserInputError("ONNX export is by tracing: pass --export-method tracing.")
    if args.sample_image:
        first = read_rgb_image(args.sample_image)
        second = first.transpose(1, 0, 2)  # the same content at another size
    elif cfg.DATASETS.TEST:
        first = read_rgb_image(dataset_record(cfg.DATASETS.TEST[0], 0)["file_name"])
        second = read_rgb_image(dataset_record(cfg.DATASETS.TEST[0], 1)["file_name"])
    else:
        raise UserInputError("Pass --sample-image: the config has no DATASETS.TEST to take one.")
    try:
        model = build_model(cfg).eval()
    except ValueError as e:  # a bad MODEL.NONLOCAL value, named by the builders
        raise UserInputError(str(e)) from None
    NonLocalCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image, other = _test_input(cfg, first), _test_input(cfg, second)
    os.makedirs(args.output, exist_ok=True)
    start = time.perf_counter()
    if args.format == "onnx":
        path = os.path.join(args.output, "model.onnx")
        adapter = export.export_onnx(model, image, path)
        run = _onnx_runner(path, adapter)
    elif args.export_method == "tracing":
        traced, adapter = export.export_tracing(model, image)
        path = os.path.join(args.output, "model.ts")
        torch.jit.save(traced, path)
        run = lambda x: export.traced_instances(traced, adapter, x)  # noqa: E731
    else:
        scripted = export.export_scripting(model)
        path = os.path.join(args.output, "model.ts")
        torch.jit.save(scripted, path)
        run = lambda x: scripted(({"image": x},))[0]  # noqa: E731
    print(f"Exported in {time.perf_counter() - start:.1f} s.")
    for name, x in (("traced image", image), ("image of another size", other)):
        differences = export.compare_with_eager(run(x), model, x)
        shown = ", ".join(f"{k} {v:.3g}" for k, v in differences.items())
        print(f"Exported vs eager, {name} {tuple(x.shape[1:])}: max |difference| {shown}")
    return path


def _onnx_runner(path: str, adapter):
    try:
        import onnxruntime
    except ImportError:
        raise UserInputError(
            "Checking the ONNX model needs onnxruntime: pip install onnxruntime"
        ) from None
    from nl_detectron import export

    session = onnxruntime.InferenceSession(path)
    return lambda x: export.onnx_instances(session, adapter, x)


def main(argv: Optional[list[str]] = None) -> None:
    run_tool(build_parser(), _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
