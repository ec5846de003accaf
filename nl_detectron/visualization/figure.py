"""Matplotlib figures of an exact size in pixels, drawn on the Agg canvas (no display needed)."""

from pathlib import Path
from typing import Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "pixel_figure", "save_png"]

DPI = 100


def pixel_figure(width: int, height: int) -> Figure:
    """A figure that :func:`save_png` writes as exactly ``width x height`` pixels.

    The figure is bound to an Agg canvas directly, so no pyplot state or GUI backend is touched.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"A figure needs a positive size; got {width} x {height} pixels.")
    fig = Figure(dpi=DPI)
    # Agg truncates inches * dpi to an integer: 1e-2 keeps e.g. 3.3 * 100 = 329.99999... from
    # becoming 329 pixels (the same guard as detectron2's VisImage).
    fig.set_size_inches((width + 1e-2) / DPI, (height + 1e-2) / DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Union[str, Path]) -> Path:
    """Write ``fig`` as a PNG at its exact pixel size, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
