#!/usr/bin/env python
"""Print box / mask / keypoint AP of two runs side by side, with the difference.

    python tools/compare_runs.py output/quickstart_baseline output/quickstart_nl
    python tools/compare_runs.py RUN_A RUN_B --names "R50 baseline" "R50 +1 NL" --which last

Each argument is the OUTPUT_DIR of a tools/train_net.py run; its metrics.json holds every
evaluation. By default the best evaluation of each run (highest segm/AP, else keypoints/AP, else
bbox/AP) is compared; --which last compares the latest.
"""

import argparse
import sys

from nl_detectron.errors import UserInputError
from nl_detectron.evaluation.run_comparison import format_comparison, load_eval_result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="OUTPUT_DIR of the baseline run")
    parser.add_argument("other", help="OUTPUT_DIR of the run to compare (e.g. with NL blocks)")
    parser.add_argument("--names", nargs=2, default=("baseline", "+NL"), metavar=("A", "B"))
    parser.add_argument("--which", choices=("best", "last"), default="best")
    parser.add_argument("--metric", default=None, help="metric for --which best, e.g. bbox/AP")
    parser.add_argument("--dataset", default=None, help="test dataset, if a run evaluated several")
    args = parser.parse_args(argv)
    try:
        results = [
            load_eval_result(d, which=args.which, metric=args.metric, dataset=args.dataset)
            for d in (args.baseline, args.other)
        ]
    except UserInputError as e:
        sys.exit(f"error: {e}")
    print(f"COCO AP ({args.which} evaluation of each run): {args.names[1]} vs {args.names[0]}")
    print(format_comparison(*results, names=args.names))


if __name__ == "__main__":
    main()
