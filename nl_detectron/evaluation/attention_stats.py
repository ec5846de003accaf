"""Where a detector's non-local blocks look on the context data (nl_detectron.data.context).

For each object (disc) of a validation image and each image-level NL block, the block's
normalised pairwise row for the query cell at the disc's centre is compared with the disc's cue:
the band (``image`` variants) or the key tile with the disc's mark (``pair`` variants). Reported:

- ``cue_mass``: the attention mass on the key cells that the cue overlaps, against
  ``uniform_mass``, the mass a uniform map would put there (their area share);
- ``decoy_mass`` (``pair`` variants): the mass on the other discs' key tiles. Matching a disc to
  its own key is ``cue_mass`` well above ``decoy_mass``; a summary of all keys (both colours)
  puts as much on each;
- ``entropy``: the row's entropy over the log of the number of keys (1: uniform);
- ``query_dependence``: half the L1 distance between the rows of two discs of one image
  (0: the same map for every query, as GCNet found for NL on COCO; 1: disjoint maps);
- ``gate``: the mean absolute gamma of the norm after W_z (or of W_z without a norm), and
  ``branch``: ``|block(x) - x| / |x|``, how much the block changes its input.

A disentangled block (DNL) is measured twice: its attention (the mean of its two terms) and, as
``<block>:pairwise``, its whitened pairwise term alone, the term meant to relate positions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.context import IMAGE_SIZE, cue_box, ensure_context_split
from ..data.generated import GeneratedSplit
from ..layers import NonLocalBlock, non_local_blocks, recorded_block_inputs, runs_on_rois

__all__ = [
    "AttentionStats",
    "block_attention_stats",
    "context_attention_stats",
    "cue_cells",
    "split_of",
]


@dataclass(frozen=True)
class AttentionStats:
    """Means over the discs (and disc pairs) of the images measured; see the module docstring."""

    block: str
    cue_mass: float
    uniform_mass: float
    decoy_mass: float
    entropy: float
    query_dependence: float
    gate: float
    branch: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cue_cells(layout: dict, disc: dict, key_shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` boolean mask of the key cells a disc's cue overlaps (key cell size: the image
    divided by the key grid)."""
    h, w = key_shape
    x0, y0, x1, y1 = cue_box(layout, disc)
    cell_w, cell_h = IMAGE_SIZE / w, IMAGE_SIZE / h
    cols = np.arange(w)
    rows = np.arange(h)
    in_x = (cols * cell_w < x1) & ((cols + 1) * cell_w > x0)
    in_y = (rows * cell_h < y1) & ((rows + 1) * cell_h > y0)
    return in_y[:, None] & in_x[None, :]


def _gate(block: NonLocalBlock) -> float:
    weight = block.out_norm.weight if block.out_norm is not None else block.out_conv.weight
    return float(weight.detach().abs().mean())


def context_attention_stats(
    model: nn.Module, split: GeneratedSplit, *, num_images: int = 40, root: str | None = None
) -> list[AttentionStats]:
    """:class:`AttentionStats` of every image-level NL block of ``model`` (on the backbone's, the
    FPN's or the box branch's features; in eval mode, CPU) on the first ``num_images`` images of
    a context validation split."""
    from detectron2.data import detection_utils

    directory = ensure_context_split(split, root)
    with open(directory / "layout.json", encoding="utf-8") as f:
        layouts = json.load(f)[:num_images]
    blocks = [(n, b) for n, b in non_local_blocks(model) if not runs_on_rois(n)]
    # (name, block, term): a disentangled block also by its whitened pairwise term alone
    measured = [(n, b, "all") for n, b in blocks]
    measured += [
        (f"{n}:pairwise", b, "pairwise") for n, b in blocks if b.pairwise == "disentangled"
    ]
    sums: dict[str, dict[str, list[float]]] = {n: _empty() for n, _, _ in measured}
    model.eval()
    for index, layout in enumerate(layouts):
        path = Path(directory) / "images" / f"{index:05d}.png"
        image = detection_utils.read_image(str(path), format="BGR")
        tensor = torch.as_tensor(image.transpose(2, 0, 1).copy())
        with torch.no_grad(), recorded_block_inputs(model) as calls:
            model([{"image": tensor, "height": IMAGE_SIZE, "width": IMAGE_SIZE}])
        inputs = {name: x for name, _, x in calls}
        for name, block, term in measured:
            source = name.split(":")[0]
            if source in inputs:
                _measure(block, inputs[source], layout, sums[name], term)
    return [_stats(name, block, sums[name]) for name, block, _ in measured]


def block_attention_stats(
    block: NonLocalBlock, inputs: Iterable[tuple[torch.Tensor, dict]], name: str = "block"
) -> AttentionStats:
    """:class:`AttentionStats` of one block (in eval mode) on given inputs: ``(x, layout)``
    pairs, x the block's input ``(1, C, H, W)`` for the context image of ``layout`` (a block
    trained outside a detector, on features computed beforehand)."""
    sums = _empty()
    for x, layout in inputs:
        _measure(block, x, layout, sums)
    return _stats(name, block, sums)


def _stats(name: str, block: NonLocalBlock, sums: dict[str, list[float]]) -> AttentionStats:
    return AttentionStats(
        block=name,
        cue_mass=_mean(sums["cue"]),
        uniform_mass=_mean(sums["uniform"]),
        decoy_mass=_mean(sums["decoy"]),
        entropy=_mean(sums["entropy"]),
        query_dependence=_mean(sums["dependence"]),
        gate=_gate(block),
        branch=_mean(sums["branch"]),
    )


def _empty() -> dict[str, list[float]]:
    return {k: [] for k in ("cue", "uniform", "decoy", "entropy", "dependence", "branch")}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _measure(
    block: NonLocalBlock, x: torch.Tensor, layout: dict, sums: dict, term: str = "all"
) -> None:
    height, width = x.shape[2:]
    stride = IMAGE_SIZE / width
    discs = layout["discs"]
    query = [int(d["center"][1] // stride) * width + int(d["center"][0] // stride) for d in discs]
    with torch.no_grad():
        index = torch.tensor(query)
        rows, key_shape = (
            block.affinity(x, index) if term == "all" else block.affinity(x, index, term)
        )
        out = block(x)
    rows = rows[0].double()  # (Q, M), one image
    m = rows.shape[1]
    sums["branch"].append(float((out - x).norm() / x.norm().clamp_min(1e-12)))
    p = rows.clamp_min(1e-12)
    sums["entropy"] += (-(p * p.log()).sum(1) / math.log(m)).tolist()
    for i, disc in enumerate(discs):
        cells = torch.as_tensor(cue_cells(layout, disc, tuple(key_shape))).flatten()
        sums["cue"].append(float(rows[i][cells].sum()))
        sums["uniform"].append(float(cells.double().mean()))
        if "keys" in layout:
            decoys = [cue_cells(layout, d, tuple(key_shape)) for d in discs if d is not disc]
            decoy = torch.as_tensor(np.any(decoys, axis=0)).flatten() & ~cells
            sums["decoy"].append(float(rows[i][decoy].sum()))
    for i in range(len(discs)):
        for j in range(i + 1, len(discs)):
            sums["dependence"].append(float(0.5 * (rows[i] - rows[j]).abs().sum()))


def split_of(name: str) -> GeneratedSplit:
    """The context split registered as ``name``."""
    from ..data.context import CONTEXT_SPLITS

    return next(s for s in CONTEXT_SPLITS if s.name == name)
