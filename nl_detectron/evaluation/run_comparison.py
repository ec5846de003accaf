"""Side-by-side COCO AP of two training runs (e.g. baseline vs non-local), as in the paper's
Tables 5 and 6, read from the ``metrics.json`` that detectron2 writes into each ``OUTPUT_DIR``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tabulate import tabulate

from ..errors import UserInputError
from .metrics_file import MAIN_TASKS, read_metrics_records

__all__ = [
    "COMPARED_METRICS",
    "EvalResult",
    "format_comparison",
    "load_eval_result",
]

# (task as detectron2 names it, column title) and the metrics shown per task.
_TASKS = (("bbox", "box"), ("segm", "mask"), ("keypoints", "kp"))
COMPARED_METRICS = ("AP", "AP50", "AP75")


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of a run.

    Attributes:
        output_dir: the run's directory.
        iteration: the training iteration the evaluation was stored at.
        metrics: ``{"bbox/AP": 38.0, "segm/AP50": 56.4, ...}`` (COCO AP in percent).
    """

    output_dir: str
    iteration: int
    metrics: dict[str, float]


def _eval_metrics(record: dict, dataset: str | None) -> dict[str, float]:
    """The ``task/metric`` entries of one metrics.json record (of ``dataset`` when the run
    evaluated several datasets and prefixed the keys with their names)."""
    found: dict[str, float] = {}
    for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == dataset:
            parts = parts[1:]
        elif len(parts) != 2:
            continue
        if parts[0] in dict(_TASKS) and isinstance(value, (int, float)):
            found["/".join(parts)] = float(value)
    return found


def load_eval_result(
    output_dir: str,
    *,
    which: str = "best",
    metric: str | None = None,
    dataset: str | None = None,
) -> EvalResult:
    """An evaluation of a run from ``output_dir/metrics.json``.

    Args:
        output_dir: a run's ``OUTPUT_DIR``.
        which: ``"best"`` (highest ``metric``) or ``"last"`` (the latest evaluation).
        metric: for ``"best"``: the metric to maximise; None: ``segm/AP`` if present, else
            ``keypoints/AP``, else ``bbox/AP`` (what ``BestCheckpointer`` tracks).
        dataset: for runs that evaluated several test datasets (keys ``<dataset>/segm/AP``):
            which one.

    Raises:
        UserInputError: no readable metrics.json in ``output_dir``, no evaluation in it, or
            ``which`` / ``metric`` invalid.
    """
    if which not in ("best", "last"):
        raise UserInputError(f"which must be 'best' or 'last', got {which!r}.")
    path, records = read_metrics_records(output_dir)
    evaluations = [
        EvalResult(output_dir, int(record["iteration"]), metrics)
        for record in records
        if (metrics := _eval_metrics(record, dataset))
    ]
    if not evaluations:
        raise UserInputError(
            f"{path} holds no evaluation results (keys like 'segm/AP'). Evaluate the run: set "
            "TEST.EVAL_PERIOD, or let training finish (it evaluates at the end), or run "
            "tools/train_net.py --eval-only with the same OUTPUT_DIR."
        )
    if which == "last":
        return evaluations[-1]
    if metric is None:
        present = {k for e in evaluations for k in e.metrics}
        metric = next((f"{t}/AP" for t in MAIN_TASKS if f"{t}/AP" in present), None)
    scored = [e for e in evaluations if _finite(e.metrics.get(metric))]
    if not scored:
        raise UserInputError(f"No evaluation in {path} has a value for {metric!r}.")
    return max(scored, key=lambda e: e.metrics[metric])


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def format_comparison(
    baseline: EvalResult, other: EvalResult, names: Sequence[str] = ("baseline", "+NL")
) -> str:
    """A table of box / mask / keypoint AP, AP50, AP75 of two runs and their difference
    (``other - baseline``, in AP points). Tasks that neither run evaluated are left out; a
    metric one run lacks shows as ``-``."""
    columns = [
        (task, title, m)
        for task, title in _TASKS
        if any(f"{task}/AP" in r.metrics for r in (baseline, other))
        for m in COMPARED_METRICS
    ]
    headers = ["", *[f"{title} {m}" if m == "AP" else m for _, title, m in columns]]

    def cell(value: float | None, signed: bool = False) -> str:
        if not _finite(value):
            return "-"
        return f"{value:+.1f}" if signed else f"{value:.1f}"

    rows = []
    for name, result in zip(names, (baseline, other)):
        row = [f"{name} (iter {result.iteration})"]
        row += [cell(result.metrics.get(f"{task}/{m}")) for task, _, m in columns]
        rows.append(row)
    delta = ["delta"]
    for task, _, m in columns:
        a, b = baseline.metrics.get(f"{task}/{m}"), other.metrics.get(f"{task}/{m}")
        delta.append(cell(b - a if _finite(a) and _finite(b) else None, signed=True))
    rows.append(delta)
    return tabulate(
        rows, headers=headers, tablefmt="simple", stralign="right", disable_numparse=True
    )
