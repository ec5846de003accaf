#!/usr/bin/env python
"""Write the pictures of a trained run: attention maps, predictions and training curves.

Reads RUN's config.yaml, model_final.pth and metrics.json (a tools/train_net.py OUTPUT_DIR) and
writes attention_map.png, predictions.png and training_curves.png into --output. E.g. after
`make demo`:

    python tools/demo_figures.py output/demo --output output/demo
"""

import argparse
import sys
from typing import Optional

import nl_detectron  # noqa: F401  (registers the backbones and heads)
import nl_detectron.data  # noqa: F401  (registers the bundled datasets)
from nl_detectron.cli import run_tool
from nl_detectron.visualization.demo_figures import write_demo_figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="OUTPUT_DIR of a training run with non-local blocks")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("--baseline", help="OUTPUT_DIR of a baseline run, for the curves")
    parser.add_argument("--dataset", help="dataset of the pictures (default: DATASETS.TEST[0])")
    parser.add_argument("--index", type=int, default=0, help="image of the attention maps")
    parser.add_argument("--num-images", type=int, default=3, help="images of predictions.png")
    return parser


def _run(args: argparse.Namespace) -> Optional[str]:
    write_demo_figures(
        args.run,
        args.output,
        baseline_dir=args.baseline,
        dataset=args.dataset,
        image_index=args.index,
        num_images=args.num_images,
    )
    return None


def main(argv: Optional[list[str]] = None) -> None:
    run_tool(build_parser(), _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
