#!/usr/bin/env python
"""The last line of ``make demo``: this run's box / mask / keypoint AP beside the range the
README documents for the demo's config over seeds 0-4 (``make demo-seeds``), which a run on any
CPU should fall in.

    python tools/demo_result.py output/demo
    python tools/demo_result.py output/demo_main --host main    # make demo-main
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from nl_detectron.cli import run_tool
from nl_detectron.errors import UserInputError
from nl_detectron.evaluation.metrics_file import read_metrics_records

# make demo-seeds on the CPU below, the README's table: (lowest, median, highest) per task, on
# each Detectron2 host (the same seed ends differently on each, as on another CPU).
DOCUMENTED = {
    "v0.6": {
        "bbox": (76.1, 79.3, 82.5),
        "segm": (80.7, 82.8, 85.2),
        "keypoints": (79.5, 83.2, 85.5),
    },
    "main": {
        "bbox": (72.5, 74.6, 85.4),
        "segm": (77.4, 80.2, 87.9),
        "keypoints": (77.7, 79.8, 89.5),
    },
}
HOST_TARGETS = {"v0.6": "make demo", "main": "make demo-main"}
DOCUMENTED_ON = "seeds 0-4 on a 2-core AMD EPYC Zen 4"
NAMES = {"bbox": "box", "segm": "mask", "keypoints": "keypoint"}


def result_line(run: str, host: str = "v0.6") -> str:
    """``Demo result: box / mask / keypoint AP a / b / c; documented range ...`` (of ``host``)."""
    documented = DOCUMENTED[host]
    _, records = read_metrics_records(run)
    evaluations = [r for r in records if "bbox/AP" in r]
    if not evaluations:
        raise UserInputError(
            f"{run}/metrics.json has no evaluation: the run did not finish (run make demo)."
        )
    final = evaluations[-1]
    aps = [final.get(f"{task}/AP", float("nan")) for task in documented]
    inside = all(lo <= ap <= hi for ap, (lo, _, hi) in zip(aps, documented.values()))
    ranges = " / ".join(f"{lo:.1f}-{hi:.1f}" for lo, _, hi in documented.values())
    return (
        f"Demo result: box / mask / keypoint AP {' / '.join(f'{ap:.1f}' for ap in aps)}; "
        f"documented range {ranges} ({DOCUMENTED_ON}, Detectron2 {host}; README): "
        + ("inside." if inside else "OUTSIDE the range.")
    )


def _run(args: argparse.Namespace) -> Optional[str]:
    print(result_line(args.run, args.host))
    return None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="OUTPUT_DIR of the demo run")
    parser.add_argument(
        "--host", choices=list(DOCUMENTED), default="v0.6", help="the Detectron2 it ran on"
    )
    run_tool(parser, _run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
