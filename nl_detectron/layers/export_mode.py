"""Tracing and ONNX export of models with non-local blocks."""

import contextlib
from collections.abc import Iterator

from torch import nn

from .pairwise import PairwiseFunction

__all__ = ["export_mode"]


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every non-local block of ``model`` computes its pairwise function with
    plain matrix products over the materialised map (the same function as in eager inference,
    to float rounding), which tracing and ONNX record correctly for any input size; eager
    inference uses fused or chunked kernels that they cannot. Restores the previous mode."""
    units = [m for m in model.modules() if isinstance(m, PairwiseFunction)]
    before = [u.export for u in units]
    for unit in units:
        unit.export = True
    try:
        yield model
    finally:
        for unit, value in zip(units, before):
            unit.export = value
