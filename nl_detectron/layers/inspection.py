"""Finding a model's non-local blocks and recording what they are given (for attention maps,
benchmarks and analysis)."""

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from .non_local_block import NonLocalBlock

__all__ = ["non_local_blocks", "recorded_block_inputs", "runs_on_rois"]


def runs_on_rois(name: str) -> bool:
    """Whether the block of qualified name ``name`` in a GeneralizedRCNN runs on each RoI's
    features (in a box, mask or keypoint head: ``roi_heads.mask_head.non_local_...``), not on
    the image's (the backbone's, the FPN's, or ``roi_heads.non_local_p2`` of
    NonLocalBoxFeatureROIHeads)."""
    parts = name.split(".")
    return parts[0] == "roi_heads" and len(parts) > 2 and parts[1].endswith("_head")


def non_local_blocks(model: nn.Module) -> list[tuple[str, NonLocalBlock]]:
    """``(qualified name, block)`` of every ``NonLocalBlock`` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NonLocalBlock)]


@contextlib.contextmanager
def recorded_block_inputs(model: nn.Module) -> Iterator[list[tuple[str, NonLocalBlock, Tensor]]]:
    """While open, ``(name, block, input)`` of every call of a ``NonLocalBlock`` of ``model``
    (inputs detached copies, in call order)."""
    calls: list[tuple[str, NonLocalBlock, Tensor]] = []

    def hook(name: str):
        return lambda module, args: calls.append((name, module, args[0].detach().clone()))

    handles = [block.register_forward_pre_hook(hook(n)) for n, block in non_local_blocks(model)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
