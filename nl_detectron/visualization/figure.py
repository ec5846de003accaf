"""Pictures as PNG files: matplotlib figures of an exact pixel size, drawn on the Agg canvas
(no display needed), and RGB arrays, optionally reduced to a palette for small files."""

from pathlib import Path
from typing import Optional, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

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


def save_png(
    picture: Union[Figure, np.ndarray], path: Union[str, Path], *, colors: Optional[int] = None
) -> Path:
    """Write a figure (at its pixel size) or an ``(H, W, 3)`` uint8 RGB array as a PNG.

    Args:
        picture: the figure or array.
        path: the PNG; its folder is created.
        colors: reduce to a palette of this many colours (2..256, median cut, no dithering):
            about 3x smaller files for pictures of photos. None keeps full RGB.
    """
    if colors is not None and not 2 <= colors <= 256:
        raise ValueError(f"A PNG palette has 2 to 256 colours; got colors={colors}.")
    if isinstance(picture, Figure):
        canvas = picture.canvas
        canvas.draw()
        # (H, W, 4) RGBA buffer of the Agg canvas -> (H, W, 3)
        picture = np.asarray(canvas.buffer_rgba())[:, :, :3]
    image = Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8))
    if colors is not None:
        image = image.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path
