"""Reading the ``metrics.json`` Detectron2 writes into a run's output directory (one JSON record
per line: losses, learning rate, and after each evaluation ``bbox/AP``, ``segm/AP50``, ...), and
which metric names a run's main result."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import UserInputError

__all__ = ["MAIN_TASKS", "main_metric_of", "read_metrics_records"]

logger = logging.getLogger(__name__)

# The task whose AP is a run's main result (and what the best checkpoint tracks), by preference:
# masks for Mask R-CNN, else keypoints for Keypoint R-CNN, else boxes.
MAIN_TASKS = ("segm", "keypoints", "bbox")


def main_metric_of(*, mask: bool, keypoints: bool) -> str:
    """``segm/AP`` for a model with a mask head, else ``keypoints/AP`` with a keypoint head,
    else ``bbox/AP`` (the order of :data:`MAIN_TASKS`)."""
    present = {"segm": mask, "keypoints": keypoints, "bbox": True}
    return next(f"{task}/AP" for task in MAIN_TASKS if present[task])


def read_metrics_records(path: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """The records of a ``metrics.json`` (or of the one in the run folder ``path``), and its path.

    A last line cut short (a run still writing) is skipped with a log line.

    Raises:
        UserInputError: no such file, or a line that is not a JSON object with an integer
            ``iteration``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "metrics.json").is_file():
            raise UserInputError(
                f"Run folder {str(path)!r} has no metrics.json; pass the OUTPUT_DIR of a "
                "training run (tools/train_net.py writes metrics.json there) or the file itself."
            )
        path = path / "metrics.json"
    if not path.is_file():
        raise UserInputError(
            f"No metrics.json at {str(path)!r}: it does not exist (looked at {path.resolve()}). "
            "Pass a training run's OUTPUT_DIR or the metrics.json in it."
        )
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.info("Skipping the incomplete last line of %s.", path)
                continue
            raise UserInputError(f"Line {number} of {str(path)!r} is not JSON: {e}.") from e
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise UserInputError(
                f"Line {number} of {str(path)!r} is not a metrics record (a JSON object with an "
                "integer 'iteration'); is this a detectron2 metrics.json?"
            )
        records.append(record)
    return path, records
