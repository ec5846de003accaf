"""Loss and AP curves of one or more training runs from detectron2's ``metrics.json``.

``metrics.json`` is written by detectron2's ``JSONWriter``: one JSON object per line, each with an
``iteration`` and the scalars logged at it (losses such as ``total_loss`` and ``loss_cls`` while
training, ``bbox/AP``, ``segm/AP50``, ``keypoints/AP`` ... after an evaluation). A resumed run
appends to the file; for an iteration logged twice the later value is kept.
"""

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from matplotlib.lines import Line2D

from ..errors import UserInputError
from ..evaluation.metrics_file import read_metrics_records
from .figure import pixel_figure, save_png

__all__ = ["DEFAULT_AP_METRICS", "RunMetrics", "load_metrics", "parse_run", "plot_metrics"]

logger = logging.getLogger(__name__)

DEFAULT_AP_METRICS = ("bbox/AP", "segm/AP", "keypoints/AP")


@dataclass(frozen=True)
class RunMetrics:
    """The scalars of one run: ``scalars[key]`` is a list of ``(iteration, value)`` by iteration."""

    label: str
    path: Path
    scalars: dict[str, list[tuple[int, float]]]

    def loss_keys(self) -> list[str]:
        """``total_loss`` first (if logged), then the ``loss_*`` components, sorted."""
        components = sorted(k for k in self.scalars if k.startswith("loss_"))
        return (["total_loss"] if "total_loss" in self.scalars else []) + components


def load_metrics(path: Union[str, Path], label: Optional[str] = None) -> RunMetrics:
    """Read a run's ``metrics.json`` (or the run folder that holds it).

    Args:
        path: the file, or a training output folder with ``metrics.json``.
        label: the run's name in legends; default: the name of the folder holding the file.

    A last line cut short (a run still writing) is skipped with a log line; any other line that
    is not a JSON object with an ``iteration`` raises ``UserInputError``.
    """
    path, records = read_metrics_records(path)
    per_key: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        iteration = record["iteration"]
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                per_key[key][iteration] = float(value)
    scalars = {key: sorted(values.items()) for key, values in per_key.items()}
    return RunMetrics(label or path.resolve().parent.name, path, scalars)


def parse_run(spec: str) -> RunMetrics:
    """A run from ``LABEL=PATH`` or ``PATH`` (labelled by its folder name)."""
    label, sep, path = spec.partition("=")
    if not sep:
        return load_metrics(spec)
    if not label or not path:
        raise UserInputError(f"Run {spec!r} should be PATH or LABEL=PATH, both non-empty.")
    return load_metrics(path, label)


def plot_metrics(
    runs: Sequence[RunMetrics],
    path: Union[str, Path],
    *,
    ap_metrics: Sequence[str] = DEFAULT_AP_METRICS,
    columns: int = 3,
    panel_size: tuple[int, int] = (420, 300),
) -> Path:
    """Plot every loss and AP metric found in the runs, one panel per metric, to a PNG.

    Panels: ``total_loss`` and each ``loss_*`` component logged by any run, then each of
    ``ap_metrics`` evaluated by any run, against the iteration. Every run is one colour on all
    panels, named in one legend at the top. The PNG is ``columns * width`` x
    ``rows * height + 30`` pixels, with ``(width, height) = panel_size`` and
    ``columns = min(columns, number of panels)``.
    """
    if not runs:
        raise UserInputError("No runs given; pass at least one metrics.json or run folder.")
    labels = [run.label for run in runs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserInputError(
            f"Several runs are labelled {', '.join(twice)}; name them with LABEL=PATH."
        )
    logged = {key for run in runs for key in run.loss_keys()}
    losses = (["total_loss"] if "total_loss" in logged else []) + sorted(logged - {"total_loss"})
    aps = [key for key in ap_metrics if any(key in run.scalars for run in runs)]
    missing = [key for key in ap_metrics if key not in aps]
    if missing:
        logger.info("No run has %s: not plotted.", ", ".join(missing))
    keys = losses + aps
    if not keys:
        raise UserInputError(
            f"None of {', '.join(str(run.path) for run in runs)} has a loss or any of "
            f"{', '.join(ap_metrics)}; nothing to plot."
        )

    columns = max(1, min(columns, len(keys)))
    rows = math.ceil(len(keys) / columns)
    legend_px = 30
    width, height = columns * panel_size[0], rows * panel_size[1] + legend_px
    fig = pixel_figure(width, height)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for index, key in enumerate(keys):
        row, col = divmod(index, columns)
        ax = fig.add_axes(
            (
                (col * panel_size[0] + 60) / width,
                ((rows - 1 - row) * panel_size[1] + 42) / height,
                (panel_size[0] - 80) / width,
                (panel_size[1] - 72) / height,
            )
        )
        is_ap = key in aps
        for run, colour in zip(runs, colours):
            points = run.scalars.get(key, [])
            if points:
                iterations, values = zip(*points)
                ax.plot(iterations, values, color=colour, marker="o" if is_ap else None, ms=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour, lw=2) for colour in colours]
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(runs),
        frameon=False,
        fontsize=9,
        bbox_to_anchor=(0.5, 1.0),
    )
    return save_png(fig, path)
