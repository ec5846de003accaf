#!/usr/bin/env python
"""The spread of ``make demo`` over seeds: the demo's config trained with ``SEED`` 0..4 (seeds stand
in for the rounding of other CPUs), with the final box / mask / keypoint AP of each run, their
median and range, and the training time.

    python benchmarks/benchmark_demo_seeds.py                     # make demo-seeds
    python benchmarks/benchmark_demo_seeds.py --seeds 0 1 --name lr02 SOLVER.BASE_LR 0.02

Runs go to ``OUTPUT/<name>/seed<k>``; a finished run (``model_final.pth`` and a final evaluation in
``metrics.json``) is reused, so the script can be stopped and resumed. Trailing ``KEY VALUE``
pairs override the config (a recipe to try); a name holds one recipe, and reusing it for other
overrides is refused. ``OUTPUT/<name>/results.json`` keeps the table's figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_name, git_revision, load_average  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "quickstart" / "mask_rcnn_nl_shapes.yaml"
TASKS = ("bbox", "segm", "keypoints")
# Targets of the demo's recipe over seeds 0-4 on one machine.
MAX_MASK_RANGE, MIN_MASK_AP, MIN_KEYPOINT_AP = 5.0, 55.0, 45.0
_SPEED = re.compile(r"Overall training speed: (\d+) iterations in (\S+) \(([\d.]+) s / it\)")


def final_aps(run: Path) -> dict[str, float] | None:
    """The final evaluation's AP of every task of a finished run, else None."""
    metrics = run / "metrics.json"
    if not (run / "model_final.pth").is_file() or not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if "bbox/AP" in r]
    if not evaluations:
        return None
    return {task: evaluations[-1].get(f"{task}/AP", float("nan")) for task in TASKS}


def training_speed(run: Path) -> dict[str, float]:
    """Seconds per iteration and training seconds, from the run's log."""
    found = _SPEED.findall((run / "log.txt").read_text()) if (run / "log.txt").is_file() else []
    if not found:
        return {}
    iterations, clock, per_iter = found[-1]
    h, m, s = (float(x) for x in clock.split(":"))
    return {"s_per_iter": float(per_iter), "train_s": 3600 * h + 60 * m + s}


def train(run: Path, config: Path, seed: int, opts: list[str]) -> None:
    command = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config),
        *opts, "SEED", str(seed), "OUTPUT_DIR", str(run),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {run} failed:\n{proc.stderr[-3000:]}")


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(results: dict) -> str:
    runs = results["runs"]
    lines = [
        f"Recipe {results['name']!r}: {results['config']} {' '.join(results['opts'])}".rstrip(),
        f"CPU: {results['cpu']}; code {results['revision']}",
        "",
        "| seed | box AP | mask AP | keypoint AP | s / iter | training (s) |",
        "|---|---|---|---|---|---|",
    ]
    for seed, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {seed} | {run['bbox']:.1f} | {run['segm']:.1f} | {run['keypoints']:.1f} | "
            f"{run.get('s_per_iter', float('nan')):.3f} | {run.get('train_s', float('nan')):.0f} |"
        )
    if runs:
        cols = {task: [r[task] for r in runs.values()] for task in TASKS}
        lines.append(
            f"| median (range) | {summary(cols['bbox'])} | {summary(cols['segm'])} | "
            f"{summary(cols['keypoints'])} | | |"
        )
        mask_range = max(cols["segm"]) - min(cols["segm"])
        lines += [
            "",
            f"Over {len(runs)} seed(s): mask AP range {mask_range:.1f} (target <= "
            f"{MAX_MASK_RANGE:g}), lowest mask AP {min(cols['segm']):.1f} (target >= "
            f"{MIN_MASK_AP:g}), lowest keypoint AP {min(cols['keypoints']):.1f} (target >= "
            f"{MIN_KEYPOINT_AP:g}).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--name", default="demo", help="the recipe's folder under OUTPUT")
    parser.add_argument("--output", type=Path, default=REPO / "output" / "demo_seeds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"overrides must be KEY VALUE pairs; got {args.opts}")

    folder = args.output / args.name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"config": str(args.config.resolve().relative_to(REPO)), "opts": args.opts}
    recipe_file = folder / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != recipe:
        parser.error(
            f"{folder} holds the runs of another recipe ({recipe_file.read_text().strip()}); "
            "pass another --name"
        )
    recipe_file.write_text(json.dumps(recipe) + "\n")

    results_file = folder / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    results.update(
        name=args.name, cpu=cpu_name(), revision=git_revision("configs/quickstart"), **recipe
    )
    for seed in args.seeds:
        run = folder / f"seed{seed}"
        if final_aps(run) is None:
            print(f"seed {seed}: training ({load_average()})", flush=True)
            start = time.perf_counter()
            train(run, args.config, seed, args.opts)
            print(f"seed {seed}: done in {time.perf_counter() - start:.0f} s", flush=True)
        aps = final_aps(run)
        assert aps is not None, run
        results["runs"][str(seed)] = {**aps, **training_speed(run)}
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    results["runs"] = {s: r for s, r in results["runs"].items() if int(s) in args.seeds}
    print(report(results))


if __name__ == "__main__":
    main()
