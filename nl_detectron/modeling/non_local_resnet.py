"""ResNet backbones (C4, DC5 and FPN) with non-local blocks inserted between residual blocks.

Paper Sec. 6: for COCO, one non-local block goes "right before the last residual block of res4"
of a ResNet-FPN Mask R-CNN fine-tuned from ImageNet.

The ResNet is Detectron2's own (``build_resnet_backbone``: depths 18-152, ResNeXt groups, res5
dilation, ``FREEZE_AT``, deformable convs). Each stage that gets NL blocks is rebuilt as an
``nn.Sequential`` that keeps the original blocks under their original names ``"0"``, ``"1"``, ...
and holds the NL blocks, in execution order, under non-numeric names (``non_local_before_5``).
So every pretrained parameter keeps its upstream name (``res4.5.conv1.weight``), and Caffe2
checkpoints still match by name (``res4_5_branch2a`` -> ``res4.5.conv1``); the NL blocks are the
only new keys.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone, ResNet, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from ..config import non_local_block_args
from .blocks import add_feature_blocks, apply_feature_blocks, build_non_local_block

__all__ = [
    "NonLocalFPN",
    "add_non_local_blocks",
    "build_non_local_resnet_backbone",
    "build_non_local_resnet_fpn_backbone",
    "insert_non_local_blocks",
    "parse_backbone_positions",
]

_KEY = "MODEL.NONLOCAL.BACKBONE_POSITIONS"
_STAGES = ("res2", "res3", "res4", "res5")


def parse_backbone_positions(
    entries: Sequence[str], num_blocks: Mapping[str, int], *, not_built_hint: str = ""
) -> dict[str, list[int]]:
    """Validate ``"STAGE:INDEX"`` placements and resolve them to insertion indices.

    Args:
        entries: placements such as ``["res4:-1"]``; ``"res4:i"`` means right before block i of
            res4 (0-based, negative counts from the end, i == number of blocks: after the last).
        num_blocks: number of residual blocks of each stage the backbone builds.
        not_built_hint: appended to the error for a stage that is not in ``num_blocks``.

    Returns:
        Stage name -> sorted insertion indices in ``0..K`` (K = the stage's number of blocks).

    Raises:
        ValueError: naming ``MODEL.NONLOCAL.BACKBONE_POSITIONS``, the bad entry and the valid
            values, for a malformed entry, an unknown or unbuilt stage, an index out of range or
            two entries that resolve to the same position.
    """
    resolved: dict[str, dict[int, str]] = {}
    for entry in entries:
        stage, index = _split_entry(entry)
        if stage not in num_blocks:
            built = ", ".join(num_blocks) or "none"
            raise ValueError(
                f"{_KEY} entry {entry!r}: stage {stage} is not built by this backbone (it builds "
                f"{built}).{' ' + not_built_hint if not_built_hint else ''}"
            )
        k = num_blocks[stage]
        if not -k <= index <= k:
            raise ValueError(
                f"{_KEY} entry {entry!r}: {stage} has {k} blocks, so INDEX must be in "
                f"{-k}..{k} ({k} places the block after the last one)."
            )
        position = index + k if index < 0 else index
        seen = resolved.setdefault(stage, {})
        if position in seen:
            raise ValueError(
                f"{_KEY} entries {seen[position]!r} and {entry!r} both place a block at "
                f"{_block_name(position, k)} of {stage}; list each position once."
            )
        seen[position] = entry
    return {stage: sorted(positions) for stage, positions in resolved.items()}


def _split_entry(entry: Any) -> tuple[str, int]:
    """``"res4:-1"`` -> ``("res4", -1)``, with an error naming the config key otherwise."""
    malformed = (
        f"{_KEY} entry {entry!r} is malformed: expected 'STAGE:INDEX' such as 'res4:-1', with "
        f"STAGE one of {', '.join(_STAGES)} and INDEX an integer."
    )
    if not isinstance(entry, str) or entry.count(":") != 1:
        raise ValueError(malformed)
    stage, index = (part.strip() for part in entry.split(":"))
    try:
        position = int(index)
    except ValueError:
        raise ValueError(malformed) from None
    if stage not in _STAGES:
        raise ValueError(
            f"{_KEY} entry {entry!r}: unknown stage {stage!r}; valid stages are "
            f"{', '.join(_STAGES)}."
        )
    return stage, position


def _block_name(position: int, num_blocks: int) -> str:
    """Module name of the NL block inserted at ``position`` of a stage of ``num_blocks``."""
    if position == num_blocks:
        return f"non_local_after_{num_blocks - 1}"
    return f"non_local_before_{position}"


def insert_non_local_blocks(
    resnet: ResNet,
    positions: Mapping[str, Sequence[int]],
    *,
    bottleneck_ratio: float = 0.5,
    block_args: Mapping[str, Any] | None = None,
) -> ResNet:
    """Insert ``NonLocalBlock``\\ s into the stages of a Detectron2 ``ResNet``, in place.

    Args:
        resnet: a ResNet, e.g. from ``build_resnet_backbone``.
        positions: stage name -> insertion indices in ``0..K``, as returned by
            :func:`parse_backbone_positions`; index i puts a block right before block i, K
            after the last block.
        bottleneck_ratio: inner channels of each block as a fraction of its channels (paper: 0.5).
        block_args: other ``NonLocalBlock`` keyword arguments (pairwise, sub_sample, scale,
            norm, init_std); default: the block's (paper) defaults.

    Returns:
        ``resnet`` itself. Original blocks keep their names; block ``i``'s NL block is named
        ``non_local_before_{i}`` (``non_local_after_{K-1}`` after the last block) and takes the
        channels of the feature map at that point (the stage's output channels, or the stage's
        input channels before block 0). NL blocks are added after ``ResNet.freeze`` ran, so they
        are trainable even inside a frozen stage: they are new, zero-initialised layers that
        cannot come from the pretrained weights, and a frozen one would stay an identity.
    """
    block_args = dict(block_args or {})
    for stage_index, (name, stage) in enumerate(zip(resnet.stage_names, resnet.stages)):
        if not positions.get(name):
            continue
        blocks = list(stage.children())
        wanted = set(positions[name])
        children: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(len(blocks) + 1):
            if i in wanted:
                channels = blocks[i].in_channels if i < len(blocks) else blocks[-1].out_channels
                children[_block_name(i, len(blocks))] = build_non_local_block(
                    channels, bottleneck_ratio=bottleneck_ratio, block_args=block_args
                )
            if i < len(blocks):
                children[str(i)] = blocks[i]
        new_stage = nn.Sequential(children)
        # ResNet runs `resnet.stages` and registers the same modules as attributes res2..res5.
        setattr(resnet, name, new_stage)
        resnet.stages[stage_index] = new_stage
    return resnet


def _not_built_hint(cfg: CfgNode) -> str:
    """Why a stage may be missing from the backbone, for the placement error."""
    out_features = list(cfg.MODEL.RESNETS.OUT_FEATURES)
    hint = (
        f"MODEL.RESNETS.OUT_FEATURES = {out_features} ends at {out_features[-1]}, so later "
        f"stages are not built."
    )
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":
        hint += (
            " With MODEL.ROI_HEADS.NAME = 'Res5ROIHeads' (C4), res5 belongs to the ROI head, "
            "where NL blocks are not supported; place them in res2..res4."
        )
    return hint


def add_non_local_blocks(
    resnet: ResNet,
    *,
    positions: Sequence[str] = ("res4:-1",),
    bottleneck_ratio: float = 0.5,
    not_built_hint: str = "",
    **block_args: Any,
) -> ResNet:
    """``resnet`` with NL blocks at ``"STAGE:INDEX"`` ``positions`` (default: the paper's, one
    block right before the last res4 block), in place; the entry point of Python (LazyConfig)
    configs, ``L(add_non_local_blocks)(resnet=L(ResNet)(...), ...)``, and what the registered
    builders call.

    Args:
        resnet: a Detectron2 ``ResNet``.
        positions: see :func:`parse_backbone_positions`.
        bottleneck_ratio: inner channels of each block as a fraction of its channels.
        not_built_hint: appended to the error for a stage ``resnet`` does not build.
        block_args: ``NonLocalBlock`` keyword arguments (pairwise, sub_sample, pool_input,
            ceil_mode, scale, norm, init_std); default: the block's (paper) defaults.
    """
    num_blocks = {name: len(stage) for name, stage in zip(resnet.stage_names, resnet.stages)}
    parsed = parse_backbone_positions(list(positions), num_blocks, not_built_hint=not_built_hint)
    return insert_non_local_blocks(
        resnet, parsed, bottleneck_ratio=bottleneck_ratio, block_args=dict(block_args)
    )


@BACKBONE_REGISTRY.register()
def build_non_local_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """Detectron2's ResNet (C4, DC5) with NL blocks at ``MODEL.NONLOCAL.BACKBONE_POSITIONS``.

    Every ``MODEL.RESNETS`` / ``MODEL.BACKBONE`` option means what it means for
    ``build_resnet_backbone``; block options come from ``MODEL.NONLOCAL``.
    """
    return add_non_local_blocks(
        build_resnet_backbone(cfg, input_shape),
        positions=cfg.MODEL.NONLOCAL.BACKBONE_POSITIONS,
        bottleneck_ratio=cfg.MODEL.NONLOCAL.BOTTLENECK_RATIO,
        not_built_hint=_not_built_hint(cfg),
        **non_local_block_args(cfg),
    )


class NonLocalFPN(FPN):
    """Detectron2's FPN with NL blocks on chosen output levels (after their output convs, so on
    the features the RPN and the RoI heads read). Not in the paper, which places its block in
    res4 only.

    Its children are the FPN's, under their names, plus ``non_local_p2``... (a vanilla FPN
    checkpoint loads). ``p6`` (``LastLevelMaxPool``) is pooled from p5 before p5's block. Not
    scriptable (its forward extends the FPN's); export it by tracing.
    """

    def __init__(
        self,
        *,
        non_local_levels: Sequence[str] = (),
        non_local_bottleneck_ratio: float = 0.5,
        non_local_args: Mapping[str, Any] | None = None,
        **fpn_kwargs: Any,
    ) -> None:
        """
        Args:
            non_local_levels: output levels that get an NL block, e.g. ``["p2"]``.
            non_local_bottleneck_ratio: inner channels as a fraction of the FPN's channels.
            non_local_args: other ``NonLocalBlock`` keyword arguments.
            fpn_kwargs: as ``FPN`` (bottom_up, in_features, out_channels, norm, top_block, ...).
        """
        super().__init__(**fpn_kwargs)
        self.non_local_levels = add_feature_blocks(
            self,
            non_local_levels,
            self._out_feature_channels,
            key="MODEL.NONLOCAL.FPN_POSITIONS",
            bottleneck_ratio=non_local_bottleneck_ratio,
            block_args=non_local_args,
        )

    def forward(self, x):
        return apply_feature_blocks(self, self.non_local_levels, super().forward(x))


def _coarsest_level_max_pool(bottom_up: Backbone, in_features: Sequence[str]) -> LastLevelMaxPool:
    """Detectron2's extra FPN level (``p6`` from ``p5``), pooled from the coarsest FPN level
    whatever it is: ``build_resnet_fpn_backbone`` always pools from ``p5``, so a ResNet cut
    before res5 (``RESNETS.OUT_FEATURES: [res2, res3]``, a bounded receptive field) fails there
    with "'p5' is not in list". With res5 in, it is the same module."""
    strides = bottom_up.output_shape()
    coarsest = max(in_features, key=lambda name: strides[name].stride)
    top_block = LastLevelMaxPool()
    top_block.in_feature = f"p{int(math.log2(strides[coarsest].stride))}"
    return top_block


@BACKBONE_REGISTRY.register()
def build_non_local_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``build_resnet_fpn_backbone`` on top of :func:`build_non_local_resnet_backbone`, with NL
    blocks on the FPN levels of ``MODEL.NONLOCAL.FPN_POSITIONS`` (none by default: then
    Detectron2's own ``FPN``, scriptable as it is)."""
    bottom_up = build_non_local_resnet_backbone(cfg, input_shape)
    fpn_args = {
        "bottom_up": bottom_up,
        "in_features": cfg.MODEL.FPN.IN_FEATURES,
        "out_channels": cfg.MODEL.FPN.OUT_CHANNELS,
        "norm": cfg.MODEL.FPN.NORM,
        "top_block": _coarsest_level_max_pool(bottom_up, cfg.MODEL.FPN.IN_FEATURES),
        "fuse_type": cfg.MODEL.FPN.FUSE_TYPE,
    }
    levels = list(cfg.MODEL.NONLOCAL.FPN_POSITIONS)
    if not levels:
        return FPN(**fpn_args)
    return NonLocalFPN(
        non_local_levels=levels,
        non_local_bottleneck_ratio=cfg.MODEL.NONLOCAL.BOTTLENECK_RATIO,
        non_local_args=non_local_block_args(cfg),
        **fpn_args,
    )
