#!/usr/bin/env python
"""Fine-tune a trained vanilla detector with non-local blocks, on the bundled shapes data (CPU).

    python tools/finetune_demo.py --output output/finetune_demo

Four ``tools/train_net.py`` runs, each printed before it starts (the quickstart configs, with a
shorter schedule and 4 images per batch):

1. ``vanilla``: the vanilla quickstart model (``mask_rcnn_baseline_shapes.yaml``), trained briefly
   from scratch; evaluated at the end.
2. ``nl_iter0``: the NL quickstart model (``mask_rcnn_nl_shapes.yaml``) with the vanilla weights,
   ``--eval-only``: the fine-tune's model at iteration 0. Its NL blocks start as identities, so
   its predictions, hence its AP, equal the vanilla model's final evaluation exactly; checked.
3. ``nl_finetune``: the NL model fine-tuned from the vanilla weights (``MODEL.WEIGHTS``), with a
   quarter of the learning rate, evaluated periodically.
4. ``vanilla_finetune``: the vanilla model trained on with the same schedule, the control: only
   a gain over it is the blocks'; the rest is the extra training.

A run whose ``OUTPUT_DIR`` already holds its result is not repeated. Prints the AP table and
writes it to ``OUTPUT/summary.md``; exits non-zero if the iteration-0 check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "quickstart"
TASKS = ("bbox", "segm", "keypoints")
DATASET = "nl_shapes_val"


def _run(name: str, args: list[str], output: Path, done: Path) -> Path:
    """Run train_net with ``args`` into ``output/name`` unless ``done`` (relative) exists."""
    run_dir = output / name
    if (run_dir / done).is_file():
        print(f"[{name}] already done: {run_dir / done}")
        return run_dir
    command = [sys.executable, "tools/train_net.py", *args, "OUTPUT_DIR", str(run_dir)]
    print(f"[{name}] " + " ".join(command), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(output / f"{name}.console.txt", "w", encoding="utf-8") as console:
        proc = subprocess.run(command, cwd=REPO, stdout=console, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (output / f"{name}.console.txt").read_text(encoding="utf-8")[-3000:]
        sys.exit(f"[{name}] failed (exit status {proc.returncode}):\n{tail}")
    return run_dir


def _schedule(iters: int, lr: float, ims_per_batch: int, eval_period: int) -> list[str]:
    """SOLVER/TEST overrides: ``iters`` iterations, lr x0.1 at 80% and 93%, warm-up 10%."""
    steps = f"({int(iters * 0.8)}, {int(iters * 0.93)})"
    return [
        "SOLVER.IMS_PER_BATCH", str(ims_per_batch),
        "SOLVER.BASE_LR", str(lr),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", steps,
        "SOLVER.WARMUP_ITERS", str(max(1, iters // 10)),
        "SOLVER.CHECKPOINT_PERIOD", str(iters),
        "TEST.EVAL_PERIOD", str(eval_period),
    ]  # fmt: skip


def _evaluations(run_dir: Path) -> list[dict]:
    """The evaluations in ``run_dir/metrics.json``, in order."""
    with open(run_dir / "metrics.json", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "segm/AP" in r]


def _copypaste(run_dir: Path) -> dict[str, dict[str, str]]:
    """The last AP tables that detectron2 printed in ``run_dir/log.txt`` (4 decimals)."""
    lines = [
        line.split("copypaste: ", 1)[1]
        for line in (run_dir / "log.txt").read_text(encoding="utf-8").splitlines()
        if "copypaste: " in line
    ]
    tables = {}
    for i in range(0, len(lines) - 2, 3):
        if lines[i].startswith("Task: "):
            names, values = lines[i + 1].split(","), lines[i + 2].split(",")
            tables[lines[i][len("Task: ") :]] = dict(zip(names, values))
    return tables


def _row(label: str, values: dict[str, float]) -> str:
    cells = [f"{values[f'{task}/AP']:.2f}" for task in TASKS]
    return f"| {label} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="output/finetune_demo", help="directory of the runs")
    parser.add_argument("--vanilla-iters", type=int, default=200)
    parser.add_argument("--finetune-iters", type=int, default=100)
    parser.add_argument("--eval-period", type=int, default=50, help="of the fine-tunes")
    parser.add_argument("--ims-per-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01, help="of the vanilla training")
    parser.add_argument(
        "--finetune-lr", type=float, default=None, help="default: a quarter of --lr"
    )
    parser.add_argument(
        "--nl-norm", default="GN", help="MODEL.NONLOCAL.NORM of the fine-tune (see docs)"
    )
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    finetune_lr = args.finetune_lr if args.finetune_lr is not None else args.lr / 4
    baseline = ["--config-file", str(CONFIGS / "mask_rcnn_baseline_shapes.yaml")]
    nl = ["--config-file", str(CONFIGS / "mask_rcnn_nl_shapes.yaml")]
    nl_opts = ["MODEL.NONLOCAL.NORM", args.nl_norm]

    vanilla = _run(
        "vanilla",
        baseline + _schedule(args.vanilla_iters, args.lr, args.ims_per_batch, 0),
        output,
        Path("model_final.pth"),
    )
    weights = ["MODEL.WEIGHTS", str(vanilla / "model_final.pth")]
    finetune = _schedule(args.finetune_iters, finetune_lr, args.ims_per_batch, args.eval_period)
    predictions = Path("inference") / DATASET / "coco_instances_results.json"
    nl_iter0 = _run("nl_iter0", nl + ["--eval-only", *weights, *nl_opts], output, predictions)
    nl_finetune = _run(
        "nl_finetune", nl + [*weights, *nl_opts, *finetune], output, Path("model_final.pth")
    )
    control = _run(
        "vanilla_finetune", baseline + [*weights, *finetune], output, Path("model_final.pth")
    )

    # Iteration 0 of the fine-tune against the vanilla model's final evaluation.
    same_predictions = (vanilla / predictions).read_bytes() == (nl_iter0 / predictions).read_bytes()
    ap = _copypaste(nl_iter0)
    same_ap = _copypaste(vanilla) == ap
    start = _evaluations(vanilla)[-1]
    lines = [
        f"Shapes val ({DATASET}), COCO AP; {args.ims_per_batch} images per batch; vanilla "
        f"{args.vanilla_iters} iterations at lr {args.lr}, then {args.finetune_iters} at lr "
        f"{finetune_lr}; NL norm {args.nl_norm}.",
        "",
        "| model | box AP | mask AP | keypoint AP |",
        "|---|---|---|---|",
        _row(f"vanilla, iteration {args.vanilla_iters} (start)", start),
        _row(
            "NL with the vanilla weights, iteration 0 (--eval-only)",
            {f"{task}/AP": float(ap[task]["AP"]) for task in TASKS},
        ),
    ]
    for name, run_dir in (("NL fine-tune", nl_finetune), ("vanilla trained on", control)):
        for record in _evaluations(run_dir):
            # Periodic evaluations are logged at the iteration before, the final one after.
            done = min(record["iteration"] + 1, args.finetune_iters)
            lines.append(_row(f"{name}, +{done} iterations", record))
    verdict = {True: "identical", False: "DIFFERENT"}
    lines += [
        "",
        f"Iteration 0 of the NL fine-tune against the vanilla model: predictions "
        f"{verdict[same_predictions]}, AP tables {verdict[same_ap]}.",
    ]
    summary = "\n".join(lines)
    print(summary)
    (output / "summary.md").write_text(summary + "\n", encoding="utf-8")
    if not (same_predictions and same_ap):
        sys.exit("error: the NL model at iteration 0 does not reproduce the vanilla model.")


if __name__ == "__main__":
    os.chdir(REPO)
    main()
