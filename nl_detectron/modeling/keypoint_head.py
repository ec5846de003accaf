"""Keypoint R-CNN head with non-local blocks between its convs (paper Sec. 6, Table 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_KEYPOINT_HEAD_REGISTRY, KRCNNConvDeconvUpsampleHead
from detectron2.structures import Instances
from torch import Tensor

from .keypoint_decoding import keypoint_rcnn_inference
from .non_local_head import NonLocalHeadMixin

__all__ = ["NonLocalKRCNNConvDeconvUpsampleHead"]


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class NonLocalKRCNNConvDeconvUpsampleHead(NonLocalHeadMixin, KRCNNConvDeconvUpsampleHead):
    """Detectron2's keypoint head (3x3 convs, deconv, 2x bilinear upsampling) with NL blocks.

    The paper puts 4 NL blocks into the 8-conv, 512-channel head, one after every 2 convs:
    ``conv_fcn1, relu1, conv_fcn2, relu2, NL, ..., conv_fcn8, relu8, NL, score_lowres``.

    Input: ``(R, C, 14, 14)`` RoI features; output: ``(R, num_keypoints, 56, 56)`` heatmap
    logits; R may be 0. Upstream's modules keep their names (``conv_fcn1``...,
    ``score_lowres``), so vanilla keypoint checkpoints load; the NL block after conv k is
    ``non_local_after_conv_fcn{k}``.

    Inference decodes the keypoints with :mod:`.keypoint_decoding`: Detectron2's result, except
    that logits which overflow Detectron2's decoding (docs/upstream.md, #6) still give keypoints,
    so any trainer, evaluator or predictor gets them, never a traceback.
    """

    positions_key = "KEYPOINT_HEAD_POSITIONS"

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_keypoints: int,
        conv_dims: Sequence[int],
        non_local_positions: Sequence[int] = (2, 4, 6, 8),
        non_local_bottleneck_ratio: float = 0.5,
        non_local_args: Mapping[str, Any] | None = None,
        conv_norm: str = "",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            input_shape, num_keypoints, conv_dims, kwargs: as ``KRCNNConvDeconvUpsampleHead``.
            non_local_positions: 1-based indices k of the convs followed by an NL block (after
                the conv's ReLU). Paper: (2, 4, 6, 8) in the 8-conv head.
            non_local_bottleneck_ratio: inner channels of each block as a fraction of its
                channels (paper: 0.5).
            non_local_args: other ``NonLocalBlock`` keyword arguments (pairwise, sub_sample,
                scale, norm, init_std); default: the block's (paper) defaults.
            conv_norm: a norm after each 3x3 conv (``"GN"``, ``"BN"``, ...; Detectron2's
                ``get_norm``), before its ReLU, as the box and mask heads' ``NORM``; ``""``:
                none, the paper's and Detectron2's head. Trained from scratch, an unnormalised
                8-conv head learns slowly (He et al., "Rethinking ImageNet Pre-training").
        """
        # Upstream initialises the head with one loop over all its parameters. It runs here,
        # before any NL block exists, so the blocks keep their own init (zero gamma: identity).
        super().__init__(input_shape, num_keypoints=num_keypoints, conv_dims=conv_dims, **kwargs)
        if conv_norm:
            # Detectron2's Conv2d applies its `norm` after the convolution; added after upstream's
            # init loop (which would re-initialise a norm's weight), with the norm's own init.
            for k, channels in enumerate(conv_dims, start=1):
                getattr(self, f"conv_fcn{k}").norm = get_norm(conv_norm, channels)
        self._insert_non_local_blocks(
            anchors=[f"conv_fcn_relu{k}" for k in range(1, len(conv_dims) + 1)],
            channels=list(conv_dims),
            positions=non_local_positions,
            name_format="non_local_after_conv_fcn{}",
            bottleneck_ratio=non_local_bottleneck_ratio,
            block_args=non_local_args,
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict[str, Any]:
        ret = cls._non_local_from_config(cfg, super().from_config(cfg, input_shape))
        ret["conv_norm"] = cfg.MODEL.ROI_KEYPOINT_HEAD.NORM
        return ret

    def forward(self, x: Tensor, instances: list[Instances]):
        """Training: upstream's losses. Inference: ``instances`` with ``pred_keypoints`` and
        ``pred_keypoint_heatmaps``, decoded without overflow (:mod:`.keypoint_decoding`)."""
        if self.training:
            return self._losses(x, instances)
        keypoint_rcnn_inference(self.layers(x), instances)
        return instances

    @torch.jit.unused
    def _losses(self, x: Tensor, instances: list[Instances]) -> dict[str, Tensor]:
        return super().forward(x, instances)
