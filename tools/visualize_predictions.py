#!/usr/bin/env python
"""Draw ground truth beside a detector's predictions for images of a registered dataset.

Boxes, masks and keypoints (with the skeleton of the dataset's ``keypoint_connection_rules``) are
drawn by detectron2's Visualizer; one PNG per image, ``<dataset>_<index>.png``. E.g.:

    python tools/visualize_predictions.py --config-file output/demo/config.yaml \
        --weights output/demo/model_final.pth --dataset nl_shapes_val --num-images 4 \
        --output output/demo/predictions
"""

import argparse
import sys
from typing import Optional

import nl_detectron  # noqa: F401  (registers the backbones and heads)
import nl_detectron.data  # noqa: F401  (registers the bundled datasets)
from nl_detectron.cli import run_tool
from nl_detectron.errors import UserInputError
from nl_detectron.visualization import (
    Predictor,
    inference_config,
    visualize_predictions,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="YAML config of the model")
    parser.add_argument(
        "--weights", help="checkpoint to load (default: MODEL.WEIGHTS; '' keeps random weights)"
    )
    parser.add_argument("--dataset", help="registered dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--num-images", type=int, default=4, help="draw the first N images")
    parser.add_argument("--indices", type=int, nargs="+", help="draw these images instead")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="hide predictions scoring below"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="drawing scale of the images")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def _run(args: argparse.Namespace) -> Optional[str]:
    cfg = inference_config(args.config_file, args.opts, weights=args.weights)
    dataset = args.dataset
    if dataset is None:
        if not cfg.DATASETS.TEST:
            raise UserInputError(
                f"{args.config_file} has no DATASETS.TEST; pass --dataset with a registered "
                "dataset name."
            )
        dataset = cfg.DATASETS.TEST[0]
    predictor = Predictor(cfg, source=args.config_file)
    visualize_predictions(
        predictor,
        dataset,
        args.output,
        num_images=args.num_images,
        indices=args.indices,
        score_threshold=args.score_threshold,
        scale=args.scale,
    )
    return None


def main(argv: Optional[list[str]] = None) -> None:
    run_tool(build_parser(), _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
