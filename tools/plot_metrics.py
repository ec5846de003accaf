#!/usr/bin/env python
"""Plot loss and AP curves of training runs from their metrics.json, runs on the same axes.

Each RUN is a training output folder or its metrics.json, optionally labelled as LABEL=PATH
(default label: the folder's name). E.g. a baseline against a non-local model:

    python tools/plot_metrics.py baseline=output/mask_rcnn_baseline nl=output/mask_rcnn_nl \
        --output output/training_curves.png
"""

import argparse
import sys
from typing import Optional

from nl_detectron.cli import run_tool
from nl_detectron.visualization import parse_run, plot_metrics
from nl_detectron.visualization.curves import DEFAULT_AP_METRICS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="[LABEL=]PATH of a run")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument(
        "--ap-metrics",
        nargs="+",
        default=list(DEFAULT_AP_METRICS),
        help="evaluation scalars to plot (default: %(default)s)",
    )
    parser.add_argument("--columns", type=int, default=3, help="panels per row")
    return parser


def _run(args: argparse.Namespace) -> Optional[str]:
    runs = [parse_run(spec) for spec in args.runs]
    path = plot_metrics(runs, args.output, ap_metrics=args.ap_metrics, columns=args.columns)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    run_tool(build_parser(), _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
