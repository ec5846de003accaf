"""Attention maps of a detector's non-local blocks for chosen query pixels (paper Sec. 5, Fig. 3).

For a query pixel i and a non-local block, the map is row i of the block's normalised pairwise
function ``f(x_i, x_j) / C(x)`` over its key positions j (Eq. 1): a softmax row that sums to 1 for
the (embedded) Gaussian, ``f / M`` for dot product and concatenation, exactly as the block
weighs ``g(x_j)``. Each block's input is captured with a forward pre-hook while the detector runs
on the image; ``NonLocalBlock.affinity`` then computes the query rows only, never the N x M map.

Blocks on image-level feature maps (the backbone) map a pixel to its feature cell through the
test-time resize and the block's stride. Blocks in the RoI heads work on the RoI features of the
final detections; a query there uses the detection it is the centre of, else the highest-scoring
detection whose box contains it, and the map is drawn over that box.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from ..errors import UserInputError
from ..layers import NonLocalBlock, non_local_blocks, recorded_block_inputs, runs_on_rois
from .figure import pixel_figure, save_png
from .predictor import Predictor

__all__ = [
    "AttentionMap",
    "AttentionResult",
    "Detections",
    "QueryPoint",
    "compute_attention_maps",
    "default_queries",
    "draw_attention_maps",
    "heat_map",
    "image_block_attention",
    "non_local_blocks",
    "roi_block_attention",
    "validate_query",
]

logger = logging.getLogger(__name__)

_SOFTMAX_FORMS = ("embedded_gaussian", "gaussian")


@dataclass(frozen=True)
class QueryPoint:
    """A query pixel ``(x, y)`` in the original image (x to the right, y down, in pixels).

    ``detection`` is the index of the detection whose box centre the point is, or None for a
    point given by the user.
    """

    x: float
    y: float
    detection: Optional[int] = None


@dataclass(frozen=True)
class Detections:
    """Detections of one image in original-image pixels.

    Attributes:
        boxes: ``(K, 4)`` XYXY boxes.
        scores: ``(K,)`` scores.
        aligned_with_rois: whether detection k is RoI k of the RoI heads' non-local blocks
            (the boxes were taken from the RoI heads' output rather than the post-processed one).
    """

    boxes: np.ndarray
    scores: np.ndarray
    aligned_with_rois: bool


@dataclass(frozen=True)
class AttentionMap:
    """One block's attention for one query.

    Attributes:
        block_name: qualified name of the block in the model.
        pairwise: the block's pairwise function.
        query: the query point.
        weights: ``(H', W')`` normalised affinities over the key grid, or None when the block has
            no map for this query (``note`` says why).
        extent: ``(left, right, bottom, top)`` of the key grid in original-image pixels (cells
            beyond the image are padding).
        query_cell: ``(row, col)`` of the query in the block's input grid.
        roi_box: for RoI-head blocks, the XYXY box of the RoI the map lies over.
        note: why ``weights`` is None.
    """

    block_name: str
    pairwise: str
    query: QueryPoint
    weights: Optional[np.ndarray]
    extent: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    query_cell: tuple[int, int] = (0, 0)
    roi_box: Optional[tuple[float, float, float, float]] = None
    note: str = ""


@dataclass(frozen=True)
class AttentionResult:
    """The image, its queries and ``maps[b][q]`` for block b and query q."""

    image: np.ndarray
    queries: list[QueryPoint]
    maps: list[list[AttentionMap]]
    detections: Detections


def validate_query(x: float, y: float, width: int, height: int) -> None:
    """Raise ``UserInputError`` unless ``0 <= x < width`` and ``0 <= y < height``."""
    if not (0 <= x < width and 0 <= y < height):
        raise UserInputError(
            f"Query point (x, y) = ({x:g}, {y:g}) is outside the image, which is {width} x "
            f"{height} pixels (width x height); give x in [0, {width}) and y in [0, {height})."
        )


def default_queries(
    detections: Detections, top_k: int, width: int, height: int
) -> list[QueryPoint]:
    """Centres of the ``top_k`` highest-scoring detections; the image centre if there are none."""
    if top_k < 1:
        raise UserInputError(f"The number of default queries must be >= 1; got {top_k}.")
    order = np.argsort(-detections.scores, kind="stable")[:top_k]
    if len(order) == 0:
        logger.info("No detections: using the image centre as the query point.")
        return [QueryPoint(width / 2, height / 2)]
    queries = []
    for k in order.tolist():
        x0, y0, x1, y1 = detections.boxes[k].tolist()
        # Clipped boxes can touch the right / bottom border; keep the centre inside the image.
        x = min((x0 + x1) / 2, math.nextafter(width, 0))
        y = min((y0 + y1) / 2, math.nextafter(height, 0))
        queries.append(QueryPoint(x, y, detection=k))
    return queries


def _key_rows(block: NonLocalBlock, x: Tensor, cells: Sequence[tuple[int, int]]) -> np.ndarray:
    """Affinity rows of the query cells: ``x`` (1, C, H, W) -> ``(Q, H', W')`` float32 array."""
    width = x.shape[3]
    index = torch.tensor([r * width + c for r, c in cells], dtype=torch.long)
    with torch.no_grad():
        rows, key_shape = block.affinity(x, index)
    # (1, Q, M) -> (Q, H', W')
    return rows[0].reshape(len(cells), *key_shape).float().cpu().numpy()


def _power_of_two_stride(padded: int, feature: int) -> int:
    """The stride of a feature map of ``feature`` cells over a ``padded``-pixel input.

    Backbone strides are powers of two; rounding keeps them exact when convolutions rounded an
    input size that the stride does not divide.
    """
    return 2 ** round(math.log2(padded / feature))


def image_block_attention(
    block_name: str,
    block: NonLocalBlock,
    x: Tensor,
    queries: Sequence[QueryPoint],
    *,
    image_size: tuple[int, int],
    resized_size: tuple[int, int],
    padded_size: tuple[int, int],
) -> list[AttentionMap]:
    """Maps of a block on an image-level feature map (e.g. in the backbone).

    Args:
        block_name, block: the block.
        x: ``(1, C, H_f, W_f)`` input of the block.
        queries: points in original-image pixels.
        image_size: ``(H, W)`` of the original image.
        resized_size: ``(h, w)`` of the image the model saw (test-time resize, before padding).
        padded_size: ``(h_p, w_p)`` of the padded input tensor of the backbone.
    """
    (height, width), (rh, rw) = image_size, resized_size
    hf, wf = x.shape[2:]
    stride_y = _power_of_two_stride(padded_size[0], hf)
    stride_x = _power_of_two_stride(padded_size[1], wf)
    cells = [
        (
            min(int(q.y * rh / height // stride_y), hf - 1),
            min(int(q.x * rw / width // stride_x), wf - 1),
        )
        for q in queries
    ]
    weights = _key_rows(block, x, cells)
    hk, wk = weights.shape[1:]
    # A key cell spans pool x stride resized pixels (pool = 2 with sub-sampling, ceil mode).
    key_h = math.ceil(hf / hk) * stride_y * height / rh
    key_w = math.ceil(wf / wk) * stride_x * width / rw
    extent = (0.0, wk * key_w, hk * key_h, 0.0)
    return [
        AttentionMap(block_name, block.pairwise, q, w, extent, cell)
        for q, w, cell in zip(queries, weights, cells)
    ]


def _containing_detection(query: QueryPoint, detections: Detections) -> Optional[int]:
    """The detection a query belongs to for RoI-head blocks (see the module docstring)."""
    if query.detection is not None and detections.aligned_with_rois:
        return query.detection
    best = None
    for k, (x0, y0, x1, y1) in enumerate(detections.boxes.tolist()):
        inside = x0 <= query.x <= x1 and y0 <= query.y <= y1
        if inside and (best is None or detections.scores[k] > detections.scores[best]):
            best = k
    return best


def roi_block_attention(
    block_name: str,
    block: NonLocalBlock,
    x: Tensor,
    queries: Sequence[QueryPoint],
    detections: Detections,
) -> list[AttentionMap]:
    """Maps of a block in an RoI head, whose input ``x`` is ``(K, C, S, S)`` for K detections.

    RoIAlign splits a box into S x S equal bins, so a point maps to its bin in the box of its
    detection; the key grid is drawn over that box.
    """
    maps = []
    s_h, s_w = x.shape[2:]
    for q in queries:
        k = _containing_detection(q, detections)
        if k is None:
            note = "no detection box contains this point"
            maps.append(AttentionMap(block_name, block.pairwise, q, None, note=note))
            continue
        x0, y0, x1, y1 = detections.boxes[k].tolist()
        bw, bh = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
        cell = (
            min(max(int((q.y - y0) / bh * s_h), 0), s_h - 1),
            min(max(int((q.x - x0) / bw * s_w), 0), s_w - 1),
        )
        weights = _key_rows(block, x[k : k + 1], [cell])[0]
        hk, wk = weights.shape
        key_h, key_w = math.ceil(s_h / hk) * bh / s_h, math.ceil(s_w / wk) * bw / s_w
        extent = (x0, x0 + wk * key_w, y0 + hk * key_h, y0)
        maps.append(
            AttentionMap(block_name, block.pairwise, q, weights, extent, cell, (x0, y0, x1, y1))
        )
    return maps


class _Recorder:
    """Forward hooks that record block inputs, the padded input size and the RoI heads' output."""

    def __init__(self, model: nn.Module, blocks: Sequence[tuple[str, NonLocalBlock]]) -> None:
        self.padded_size: Optional[tuple[int, int]] = None
        # (K, 4) boxes in resized-image pixels and (K,) scores of the RoI heads' detections.
        self.roi_boxes: Optional[Tensor] = None
        self.roi_scores: Optional[Tensor] = None
        wanted = {name for name, _ in blocks}
        self._record = recorded_block_inputs(model)
        self._calls = self._record.__enter__()
        self._wanted = wanted
        self._handles = []
        backbone = getattr(model, "backbone", None)
        if isinstance(backbone, nn.Module):
            self._handles.append(backbone.register_forward_pre_hook(self._backbone_hook))
        roi_heads = getattr(model, "roi_heads", None)
        if isinstance(roi_heads, nn.Module):
            self._handles.append(roi_heads.register_forward_hook(self._roi_heads_hook))

    @property
    def inputs(self) -> dict[str, Tensor]:
        """The last input of each block recorded."""
        return {name: x for name, _, x in self._calls if name in self._wanted}

    def _backbone_hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.padded_size = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    def _roi_heads_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # StandardROIHeads at inference: (list of Instances in resized coordinates, {}).
        if isinstance(output, tuple) and output and isinstance(output[0], list) and output[0]:
            instances = output[0][0]
            if instances.has("pred_boxes") and instances.has("scores"):
                # Copies: post-processing rescales these boxes in place afterwards.
                self.roi_boxes = instances.pred_boxes.tensor.detach().cpu().clone()
                self.roi_scores = instances.scores.detach().cpu().clone()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._record.__exit__(None, None, None)


def _detections(
    recorder: _Recorder,
    instances: Any,
    image_size: tuple[int, int],
    resized_size: tuple[int, int],
) -> Detections:
    """Detections in original pixels, aligned with the RoI heads' inputs when possible."""
    if recorder.roi_boxes is not None and recorder.roi_scores is not None:
        # The RoI heads ran on these boxes, in this order; post-processing may drop some.
        scale = np.array([image_size[1] / resized_size[1], image_size[0] / resized_size[0]] * 2)
        boxes = recorder.roi_boxes.numpy() * scale
        return Detections(boxes, recorder.roi_scores.numpy(), aligned_with_rois=True)
    if instances.has("pred_boxes") and instances.has("scores"):
        return Detections(
            instances.pred_boxes.tensor.numpy(), instances.scores.numpy(), aligned_with_rois=False
        )
    return Detections(np.zeros((0, 4)), np.zeros((0,)), aligned_with_rois=False)


def compute_attention_maps(
    predictor: Predictor,
    image_rgb: np.ndarray,
    points: Optional[Sequence[tuple[float, float]]] = None,
    *,
    top_k: int = 3,
    block_names: Optional[Sequence[str]] = None,
) -> AttentionResult:
    """Run ``predictor`` on an image and compute each non-local block's map for each query.

    Args:
        predictor: the detector.
        image_rgb: ``(H, W, 3)`` uint8 RGB image.
        points: query points ``(x, y)`` in image pixels; None: the centres of the ``top_k``
            highest-scoring detections (the image centre if there are none).
        top_k: number of default queries.
        block_names: qualified names of the blocks to show; None: all.

    Blocks that did not run, have ``dim != 2``, or whose input matches neither an image-level
    map nor the detections' RoIs are skipped with a log line.
    """
    height, width = image_rgb.shape[:2]
    blocks = non_local_blocks(predictor.model)
    if not blocks:
        raise UserInputError(
            f"The model built from {predictor.source} has no non-local blocks, so there is no "
            "attention to show. Use a config whose backbone or heads have non-local blocks (e.g. "
            "MODEL.BACKBONE.NAME build_non_local_resnet_fpn_backbone with "
            "MODEL.NONLOCAL.BACKBONE_POSITIONS)."
        )
    if block_names is not None:
        known = [name for name, _ in blocks]
        unknown = [name for name in block_names if name not in known]
        if unknown:
            raise UserInputError(
                f"No non-local block named {', '.join(unknown)} in the model built from "
                f"{predictor.source}; its blocks are: {', '.join(known)}."
            )
        blocks = [(name, block) for name, block in blocks if name in block_names]
    if points is not None:
        if not points:
            raise UserInputError("No query points given; give at least one x,y point.")
        for x, y in points:
            validate_query(x, y, width, height)

    for name, _ in blocks:
        if name in predictor.blocks_without_weights:
            logger.warning(
                "Non-local block %s has no weights in %s: its map shows its random initialisation.",
                name,
                predictor.cfg.MODEL.WEIGHTS,
            )
    recorder = _Recorder(predictor.model, blocks)
    try:
        prediction = predictor(image_rgb)
    finally:
        recorder.remove()
    image_size = (height, width)
    detections = _detections(recorder, prediction.instances, image_size, prediction.resized_size)
    if points is None:
        queries = default_queries(detections, top_k, width, height)
    else:
        queries = [QueryPoint(float(x), float(y)) for x, y in points]

    maps = []
    for name, block in blocks:
        x = recorder.inputs.get(name)
        if x is None:
            logger.info("Skipping non-local block %s: it did not run on this image.", name)
        elif block.dim != 2:
            logger.info("Skipping non-local block %s: it is %dD, not 2D.", name, block.dim)
        elif runs_on_rois(name):
            if len(detections.scores) == 0:
                logger.info("Skipping non-local block %s: no detections, so no RoIs.", name)
            elif detections.aligned_with_rois and x.shape[0] == len(detections.scores):
                maps.append(roi_block_attention(name, block, x, queries, detections))
            else:
                logger.info(
                    "Skipping non-local block %s: its %d RoIs are not the %d detections.",
                    name,
                    x.shape[0],
                    len(detections.scores),
                )
        elif x.shape[0] == 1:
            padded = recorder.padded_size or prediction.resized_size
            maps.append(
                image_block_attention(
                    name,
                    block,
                    x,
                    queries,
                    image_size=image_size,
                    resized_size=prediction.resized_size,
                    padded_size=padded,
                )
            )
        else:
            logger.info(
                "Skipping non-local block %s: its input %s is not one image's feature map.",
                name,
                tuple(x.shape),
            )
    return AttentionResult(image_rgb, queries, maps, detections)


def _map_title(amap: AttentionMap) -> str:
    """Three lines: the block (its last two name parts), the query and pairwise function, the
    map's value range."""
    q = amap.query
    name = ".".join(amap.block_name.split(".")[-2:])
    head = f"{name}\nquery ({q.x:.0f}, {q.y:.0f}), {amap.pairwise}"
    if amap.weights is None:
        return head
    w = amap.weights
    if amap.pairwise in _SOFTMAX_FORMS:
        return f"{head}\npeak {w.max():.3g} (uniform {1 / w.size:.3g})"
    return f"{head}\nf/M in [{w.min():.3g}, {w.max():.3g}]"


def heat_map(weights: np.ndarray, alpha: float, *, stretch: bool = False) -> np.ndarray:
    """``(H', W')`` map -> ``(H', W', 4)`` RGBA overlay, coloured and opaque by value.

    Values are scaled from 0 (or the lowest value, if negative) to the highest, so a uniform
    softmax row covers the image evenly while a peaked one leaves the rest of it visible. With
    ``stretch``, from the lowest value to the highest instead, which shows the pattern of a
    nearly uniform map (but makes it look as peaked as any other).
    """
    low = float(weights.min()) if stretch else min(float(weights.min()), 0.0)
    high = float(weights.max())
    scaled = (weights - low) / (high - low) if high > low else np.ones_like(weights)
    rgba = colormaps["jet"](scaled)
    rgba[..., 3] = alpha * scaled
    return rgba


def _draw_panel(
    ax: Axes, image: np.ndarray, amap: AttentionMap, alpha: float, stretch: bool
) -> None:
    height, width = image.shape[:2]
    ax.imshow(image, extent=(0, width, height, 0))
    if amap.weights is None:
        ax.imshow(np.zeros((1, 1)), extent=(0, width, height, 0), cmap="gray", alpha=0.6)
        ax.text(width / 2, height / 2, amap.note, color="white", ha="center", va="center")
    else:
        overlay = heat_map(amap.weights, alpha, stretch=stretch)
        ax.imshow(overlay, extent=amap.extent, interpolation="nearest")
    if amap.roi_box is not None:
        x0, y0, x1, y1 = amap.roi_box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
    ax.plot([amap.query.x], [amap.query.y], marker="o", ms=8, mfc="white", mec="black", mew=1.5)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    ax.set_title(_map_title(amap), fontsize=7, pad=3)


def draw_attention_maps(
    result: AttentionResult,
    path: Union[str, Path],
    *,
    panel_size: int = 320,
    alpha: float = 0.7,
    stretch: bool = False,
    colors: Optional[int] = None,
) -> Path:
    """Draw one panel per block (rows) and query (columns) and save it as a PNG.

    Each panel shows the image with the map as a heat map (colour and opacity rise from 0, or
    the lowest value if negative, to the highest, where the opacity is ``alpha``), the query
    point as a white dot and, for RoI-head blocks, the RoI's box; ``stretch``: see
    :func:`heat_map`. The PNG is
    ``(queries * panel_size) x (blocks * panel_size)`` pixels; ``colors`` reduces it to a palette
    (see :func:`save_png`).
    """
    if not result.maps:
        raise UserInputError(
            "None of the model's non-local blocks gave an attention map for this image (see the "
            "log for why each was skipped)."
        )
    if panel_size < 64:
        raise UserInputError(f"Panel size must be at least 64 pixels; got {panel_size}.")
    rows, cols = len(result.maps), len(result.queries)
    fig = pixel_figure(cols * panel_size, rows * panel_size)
    title_px, margin_px = 48, 6
    for r, row in enumerate(result.maps):
        for c, amap in enumerate(row):
            left = (c * panel_size + margin_px) / (cols * panel_size)
            bottom = ((rows - 1 - r) * panel_size + margin_px) / (rows * panel_size)
            ax = fig.add_axes(
                (
                    left,
                    bottom,
                    (panel_size - 2 * margin_px) / (cols * panel_size),
                    (panel_size - title_px - margin_px) / (rows * panel_size),
                )
            )
            _draw_panel(ax, result.image, amap, alpha, stretch)
    return save_png(fig, path, colors=colors)
