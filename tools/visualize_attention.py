#!/usr/bin/env python
"""Draw the attention maps of a detector's non-local blocks for query points of one image.

One panel per block and query point: the block's normalised affinities of the query over its
key positions, as a heat map over the image. Query points are x,y pixels of the original image;
by default the centres of the top-scoring detections. E.g.:

    python tools/visualize_attention.py --config-file output/demo/config.yaml \
        --weights output/demo/model_final.pth --dataset nl_shapes_val --index 0 \
        --output output/demo/attention_map.png
    python tools/visualize_attention.py --config-file configs/mask_rcnn_nl.yaml \
        --weights model_final.pth --input image.jpg --query 120,80 --query 300,200 \
        --output attention.png MODEL.DEVICE cpu
"""

import argparse
import sys
from typing import Optional

import nl_detectron  # noqa: F401  (registers the backbones and heads)
import nl_detectron.data  # noqa: F401  (registers the bundled datasets)
from nl_detectron.cli import run_tool
from nl_detectron.visualization import (
    Predictor,
    compute_attention_maps,
    dataset_record,
    draw_attention_maps,
    inference_config,
    read_rgb_image,
)


def _point(text: str) -> tuple[float, float]:
    """``"x,y"`` -> ``(x, y)``."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"query point {text!r} should be x,y in image pixels, e.g. 120,80"
        ) from None
    return x, y


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="YAML config of the model")
    parser.add_argument(
        "--weights", help="checkpoint to load (default: MODEL.WEIGHTS; '' keeps random weights)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an image file")
    source.add_argument("--dataset", help="a registered dataset, e.g. nl_shapes_val")
    parser.add_argument("--index", type=int, default=0, help="image index in --dataset")
    parser.add_argument(
        "--query",
        type=_point,
        action="append",
        metavar="X,Y",
        help="query point in original-image pixels (repeatable); "
        "default: centres of the top-scoring detections",
    )
    parser.add_argument("--top-k", type=int, default=3, help="number of default query points")
    parser.add_argument(
        "--block", action="append", help="qualified name of a block to show (repeatable)"
    )
    parser.add_argument("--panel-size", type=int, default=320, help="panel side, pixels")
    parser.add_argument(
        "--stretch",
        action="store_true",
        help="colour each map from its lowest to its highest value (default: from 0)",
    )
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def _run(args: argparse.Namespace) -> Optional[str]:
    cfg = inference_config(args.config_file, args.opts, weights=args.weights)
    if args.input is not None:
        image = read_rgb_image(args.input)
    else:
        image = read_rgb_image(dataset_record(args.dataset, args.index)["file_name"])
    predictor = Predictor(cfg, source=args.config_file)
    result = compute_attention_maps(
        predictor, image, args.query, top_k=args.top_k, block_names=args.block
    )
    path = draw_attention_maps(
        result, args.output, panel_size=args.panel_size, stretch=args.stretch
    )
    return path


def main(argv: Optional[list[str]] = None) -> None:
    run_tool(build_parser(), _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
