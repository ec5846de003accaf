"""The non-local block of "Non-local Neural Networks" (Wang et al., CVPR 2018), Sec. 3.

    y_i = 1 / C(x) * sum_j f(x_i, x_j) g(x_j)        z_i = W_z y_i + x_i        (Eq. 1 and 6)

Shapes: N is the batch (as in detectron2), HW the number of query positions (all spatial
positions, whatever ``dim``), M the number of key positions after sub-sampling, C the block's
channels and C' the inner channels. The pairwise functions f (:mod:`.pairwise`) never
materialise the HW x M map whole; the tensor helpers are in :mod:`.tensor_ops`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from torch import Tensor, nn

from .mixed_precision import autocast_dtype, float32_region
from .pairwise import make_pairwise
from .sync_batch_norm import SyncBatchNorm
from .tensor_ops import (
    MaxPoolKeepingIndices,
    conv_matrix,
    linear,
    pointwise,
    pool_window,
    shape_str,
)

__all__ = ["NORMS", "NonLocalBlock"]

NORMS = ("BN", "SyncBN", "GN", "")
_INITS = ("normal", "msra", "fan_in")
_INPUT_LAYOUT = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, T, H, W)"}


def _make_norm(norm: Optional[str], channels: int, dim: int) -> Optional[nn.Module]:
    """The norm after ``W_z`` (paper Sec. 4.1: BN with gamma initialised to 0), or None."""
    if norm is None or norm == "":
        return None
    if norm == "FrozenBN":
        raise ValueError(
            "NonLocalBlock does not support norm='FrozenBN': its gamma is initialised to 0 and a "
            "frozen BN never updates it, so the block would stay a no-op forever. "
            "Use norm='BN', 'SyncBN', 'GN' or '' (no norm; then W_z is zero-initialised)."
        )
    if norm == "BN":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](channels)
    if norm == "SyncBN":
        # Plain batch norm when torch.distributed is not initialised or has a single process;
        # synchronised across processes on GPUs and, unlike nn.SyncBatchNorm, on CPUs (gloo).
        return SyncBatchNorm(channels)
    if norm == "GN":
        if channels % 32 != 0:
            raise ValueError(
                f"NonLocalBlock with norm='GN' uses GroupNorm with 32 groups, so in_channels must "
                f"be divisible by 32; got in_channels={channels}."
            )
        return nn.GroupNorm(32, channels)
    raise ValueError(f"Unknown norm {norm!r} for NonLocalBlock; valid norms are {NORMS}.")


class NonLocalBlock(CNNBlockBase):
    """Non-local block (paper Sec. 3.3, Fig. 2) for 1D, 2D or spatio-temporal 3D feature maps.

    Input and output: ``(N, C, L)`` for ``dim=1``, ``(N, C, H, W)`` for ``dim=2``,
    ``(N, C, T, H, W)`` for ``dim=3``; the output has the input's shape and the block is an exact
    identity at construction (the last norm's gamma, or ``W_z`` without a norm, is zero).

    Args:
        in_channels: C, channels of the input and output.
        dim: 1, 2 or 3 spatial dimensions.
        pairwise: ``"embedded_gaussian"`` (default, the paper's), ``"gaussian"``,
            ``"dot_product"`` or ``"concatenation"`` (Sec. 3.2); ``"disentangled"`` (a whitened
            pairwise term plus a unary term, Yin et al. 2020) or ``"global_context"`` (the
            query-independent control of GCNet, Cao et al. 2019), see :mod:`.pairwise`.
        inner_channels: C', channels of theta, phi and g; default ``in_channels // 2`` (Sec. 3.3).
        sub_sample: max-pool phi and g by 2 (1D), 2x2 (2D) or 1x2x2 (3D) (Sec. 3.3).
        pool_input: sub-sample x itself before phi and g, as FAIR's released code and
            pytorchvideo do, instead of phi(x) and g(x), as the paper's text and mmcv do. The two
            are different functions (max-pooling does not commute with the embeddings).
        ceil_mode: pooling keeps the partial windows at odd sizes (the last row, sizes of 1);
            False drops them, as the released code and pytorchvideo do.
        scale: factor on the logits of the two Gaussian forms. None means ``C' ** -0.5`` for the
            embedded Gaussian (the released code's default) and ``C ** -0.5`` for the Gaussian,
            whose logits are dot products of raw C-channel features; 1.0 is the paper's formula.
            Ignored by dot product and concatenation.
        norm: ``"BN"``, ``"SyncBN"``, ``"GN"`` (32 groups) or ``""``/None, after ``W_z``.
            ``"FrozenBN"`` is refused: with gamma 0 it would keep the block a no-op.
        init: the Gaussian init of the 1x1 convs: ``"normal"`` (std ``init_std``, the released
            code's), ``"msra"`` (He, fan-out, the paper's words) or ``"fan_in"`` (std
            ``C_in ** -0.5``: with the default scale, embedded-Gaussian logits of unit variance
            at init whatever the widths, where the other two give near-uniform or near one-hot
            attention on wide or narrow maps).
        init_std: std of the ``"normal"`` init (released code: 0.01).
        gate_init: initial gamma of the norm after W_z (without a norm: the std of W_z's
            init). 0, the paper's (Sec. 4.1), makes the block an exact identity at
            construction, as inserting it into a pretrained network needs; then neither theta nor
            phi gets a gradient until gamma has moved, which nothing pairwise can make it do
            (see docs/evidence.md). A small positive value (LayerScale-like) gives the pairwise
            function a gradient from the first step, for training from scratch.
        temperature: divides the whitened logits of the disentangled form (authors' code: 0.05).
        inference_chunk_elements: the softmax forms in CPU inference compute the pairwise map in
            blocks of at most this many entries (default 2^24: 64 MB in float32).

    Submodules: ``theta``, ``phi`` (None for the Gaussian form, which uses x itself), ``g``,
    ``concat_project`` (w_f of the concatenation form, else None), ``conv_mask`` (w_m, the
    1-channel 1x1 conv of the disentangled and global-context forms, else None), ``out_conv`` (W_z),
    ``out_norm`` (None without a norm) and ``pairwise_fn`` (f, no parameters). The 1x1
    convolutions are stored as ``nn.Conv{1,2,3}d`` (the usual checkpoint layout) but applied as
    matrix products over the flattened positions, the same arithmetic and faster on CPU; their
    forward hooks therefore do not run.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        dim: int = 2,
        pairwise: str = "embedded_gaussian",
        inner_channels: Optional[int] = None,
        sub_sample: bool = True,
        pool_input: bool = False,
        ceil_mode: bool = True,
        scale: Optional[float] = None,
        norm: Optional[str] = "BN",
        init: str = "normal",
        init_std: float = 0.01,
        gate_init: float = 0.0,
        temperature: float = 0.05,
        inference_chunk_elements: int = 1 << 24,
    ) -> None:
        super().__init__(in_channels, in_channels, 1)
        if dim not in (1, 2, 3):
            raise ValueError(f"NonLocalBlock supports dim 1, 2 or 3; got dim={dim!r}.")
        if inner_channels is None:
            inner_channels = in_channels // 2
        if inner_channels <= 0:
            raise ValueError(
                f"NonLocalBlock needs a positive number of inner channels; got "
                f"inner_channels={inner_channels} (in_channels={in_channels})."
            )
        if scale is not None and scale <= 0:
            raise ValueError(f"NonLocalBlock scale must be positive or None; got scale={scale}.")
        if init not in _INITS:
            raise ValueError(f"Unknown init {init!r} for NonLocalBlock; valid ones are {_INITS}.")
        if gate_init < 0:
            raise ValueError(f"NonLocalBlock gate_init must be >= 0; got gate_init={gate_init}.")
        self.dim = dim
        self.pairwise = pairwise
        self.inner_channels = inner_channels
        self.sub_sample = sub_sample
        self.pool_input = pool_input
        self.ceil_mode = ceil_mode
        self._input_layout = _INPUT_LAYOUT[dim]
        self.pairwise_fn = make_pairwise(
            pairwise, in_channels, inner_channels, scale, inference_chunk_elements, temperature
        )
        self.scale: Optional[float] = getattr(self.pairwise_fn, "scale", None)

        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        embeds = self.pairwise_fn.uses_embeddings
        self.theta = conv(in_channels, inner_channels, 1) if embeds else None
        self.phi = conv(in_channels, inner_channels, 1) if embeds else None
        self.g = conv(in_channels, inner_channels, 1)
        # w_f of ReLU(w_f^T [theta_i, phi_j]), a 1x1 conv from the 2C' concatenated channels.
        self.concat_project = (
            conv(2 * inner_channels, 1, 1, bias=False) if pairwise == "concatenation" else None
        )
        # w_m of the unary term (disentangled) or of the context weights (global context)
        self.conv_mask = (
            conv(in_channels, 1, 1, bias=False) if self.pairwise_fn.uses_unary else None
        )
        self.out_norm = _make_norm(norm, in_channels, dim)
        self.out_conv = conv(inner_channels, in_channels, 1, bias=self.out_norm is None)
        # On an empty batch a training-mode batch norm has no statistics: it is skipped there,
        # except a SyncBN that synchronises, which must join the other processes' collectives.
        self._batch_norm = isinstance(self.out_norm, nn.modules.batchnorm._BatchNorm)
        self._sync_norm = isinstance(self.out_norm, SyncBatchNorm)

        for layer in (
            self.theta,
            self.phi,
            self.g,
            self.concat_project,
            self.conv_mask,
            self.out_conv,
        ):
            if layer is not None:
                if init == "msra":
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                elif init == "fan_in":
                    nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
                else:
                    nn.init.normal_(layer.weight, std=init_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        # The gate last (Sec. 4.1): zero, the block starts as an identity, so inserting it into a
        # pretrained network keeps that network's behaviour.
        if self.out_norm is not None:
            nn.init.constant_(self.out_norm.weight, gate_init)
        else:
            nn.init.normal_(self.out_conv.weight, std=gate_init)  # std 0: zeros
            nn.init.zeros_(self.out_conv.bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, pairwise={self.pairwise!r}, inner_channels={self.inner_channels}, "
            f"sub_sample={self.sub_sample}, pool_input={self.pool_input}, "
            f"ceil_mode={self.ceil_mode}, scale={self.scale}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, *S) -> (N, C, *S)``: ``x + norm(W_z y)`` with y of Eq. 1."""
        self._check_input(x)
        # (N, C, *S) -> (N, C, HW), a view
        flat = x.flatten(2)
        # Keys and values, sub-sampled: (N, K, M), (N, C', M); K = C' (phi), C (the Gaussian
        # form's x), C' + 1 (phi and the unary logits: disentangled) or 1 (global context)
        keys, values, _ = self._keys_values(x, flat)
        # norm(W_z y + b_z): (N, C, *S)
        if torch.jit.is_scripting():
            z = self._residual(flat, keys, values, list(x.shape), x.dtype)
        else:
            z = self._residual_in_precision(flat, keys, values, list(x.shape), x.dtype)
        if z.dtype != x.dtype:  # autocast
            return x + z
        # In place: neither the norm nor W_z keeps its output for the backward pass.
        return z.add_(x)

    # ----------------------------------------------------------------------------------------
    # The steps of forward.

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"NonLocalBlock(dim={self.dim}) takes an input of shape "
                f"{self._input_layout}. Got {shape_str(x.shape)} instead!"
            )

    def _theta_weight(self) -> Optional[Tensor]:
        return None if self.theta is None else self.theta.weight

    def _theta_bias(self) -> Optional[Tensor]:
        return None if self.theta is None else self.theta.bias

    def _w_f(self) -> Optional[Tensor]:
        return None if self.concat_project is None else self.concat_project.weight

    def _output_terms(
        self, flat: Tensor, keys: Tensor, values: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``W_z y + b_z`` as ``(weight, bias, inputs)``, inputs in ``dtype``: W_z, b_z and
        ``y`` (N, C', HW) of Eq. 1; or for the dot product on a large map, one ``(N, C, C)`` map
        of x itself and inputs None (the pairwise form's ``output_map``)."""
        w_z, theta_weight, theta_bias = self.out_conv, self._theta_weight(), self._theta_bias()
        if self.pairwise_fn.folds_output(flat.shape[2]):
            assert theta_weight is not None and theta_bias is not None
            weight, bias = self.pairwise_fn.output_map(
                keys, values, theta_weight, theta_bias, w_z.weight, w_z.bias, dtype
            )
            return weight, bias, None
        queries = self.pairwise_fn.embed_queries(flat, theta_weight, theta_bias, self._w_f())
        # y of Eq. 1: (N, C', HW)
        y = self.pairwise_fn(queries, keys, values, self._w_f())
        return conv_matrix(w_z.weight), w_z.bias, y.to(dtype)

    def _residual(
        self, flat: Tensor, keys: Tensor, values: Tensor, shape: list[int], dtype: torch.dtype
    ) -> Tensor:
        """``norm(W_z y + b_z)`` in the shape ``shape`` of x (y of Eq. 1 in ``dtype``)."""
        weight, bias, y = self._output_terms(flat, keys, values, dtype)
        # W_z y + b_z as weight @ inputs + bias, the inputs being y, or x itself (None)
        return self._project(flat if y is None else y, shape, weight, bias)

    @torch.jit.unused
    def _residual_in_precision(
        self, flat: Tensor, keys: Tensor, values: Tensor, shape: list[int], dtype: torch.dtype
    ) -> Tensor:
        """:meth:`_residual`, under autocast in float32 for the forms whose products would lose
        their float32 to autocast (:mod:`.mixed_precision`), W_z and the norm included: their y
        grows with the square (concatenation) or cube (dot product) of the features, so
        ``W_z y`` could overflow float16 before the norm brings it back. Fused attention (the
        softmax forms, whose y is an average of g) runs under autocast."""
        if self.pairwise_fn.computes_in_float32 and autocast_dtype(flat.device.type) is not None:
            return float32_region(self._residual, flat, keys, values, shape, torch.float32)
        return self._residual(flat, keys, values, shape, dtype)

    def _keys_values(self, x: Tensor, flat: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Sub-sampled keys and g(x_j): phi(x_j) (x_j for the Gaussian form), with the unary
        logits ``w_m^T x_j`` of ``conv_mask`` as the last row for the forms that have one.

        ``(N, C, *S), (N, C, HW) -> (N, K, M), (N, C', M)`` and the sub-sampled grid ``S'``,
        ``M = prod(S')``. The embeddings are pooled, or with ``pool_input`` computed from the
        pooled x.
        """
        source, pool_after = x, self.sub_sample
        if self.sub_sample and self.pool_input:
            # (N, C, *S) -> (N, C, *S'), then (N, C, M')
            source, pool_after = self._pool(x), False
            flat = source.flatten(2)
        spatial = list(source.shape[2:])
        if self.phi is None and self.conv_mask is None:
            # The Gaussian form compares x itself: (N, C', L) -> (N, C', *S)
            values = pointwise(self.g.weight, self.g.bias, flat)
            values = values.view([x.shape[0], self.inner_channels] + spatial)
            keys = source
            if pool_after:
                keys, values = self._pool(keys), self._pool(values)
            # (N, C, *S') -> (N, C, M)
            return keys.flatten(2), values.flatten(2), list(values.shape[2:])
        # The embeddings in one product, keys first: phi (C'), the unary logits of conv_mask (1),
        # then g (C'): (N, C, L) -> (N, K + C', L) -> (N, K + C', *S)
        weights: list[Tensor] = []
        biases: list[Tensor] = []
        g_bias = self.g.bias
        assert g_bias is not None
        if self.phi is not None:
            phi_bias = self.phi.bias
            assert phi_bias is not None
            weights.append(self.phi.weight)
            biases.append(phi_bias)
        if self.conv_mask is not None:
            weights.append(self.conv_mask.weight)
            biases.append(g_bias.new_zeros(1))  # a bias would shift every logit alike
        weights.append(self.g.weight)
        biases.append(g_bias)
        weight = torch.cat(weights)
        stacked = pointwise(weight, torch.cat(biases), flat)
        stacked = stacked.view([x.shape[0], weight.shape[0]] + spatial)
        if pool_after:
            stacked = self._pool(stacked)
        key_shape = list(stacked.shape[2:])
        # (N, K + C', *S') -> (N, K + C', M) -> (N, K, M), (N, C', M)
        stacked = stacked.flatten(2)
        split = stacked.shape[1] - self.inner_channels
        return stacked[:, :split], stacked[:, split:], key_shape

    def _pool(self, t: Tensor) -> Tensor:
        """Max-pool by 2 (1D), 2x2 (2D) or 1x2x2 (3D), partial windows kept with ``ceil_mode``."""
        if not torch.jit.is_scripting() and t.requires_grad and torch.is_grad_enabled():
            return self._pool_keeping_indices(t)
        ceil = self.ceil_mode
        if self.dim == 1:
            return F.max_pool1d(t, 2, 2, 0, 1, ceil)
        if self.dim == 2:
            return F.max_pool2d(t, 2, 2, 0, 1, ceil)
        return F.max_pool3d(t, [1, 2, 2], [1, 2, 2], 0, 1, ceil)

    @torch.jit.unused
    def _pool_keeping_indices(self, t: Tensor) -> Tensor:
        """:meth:`_pool` for autograd, saving int32 indices only (MaxPoolKeepingIndices)."""
        return MaxPoolKeepingIndices.apply(t, pool_window(self.dim), self.ceil_mode)

    def _project(
        self, inputs: Tensor, shape: list[int], weight: Tensor, bias: Optional[Tensor]
    ) -> Tensor:
        """``norm(weight inputs + bias)`` in the shape ``shape`` of x.

        ``weight inputs + bias`` is ``W_z y``: ``(C, C')`` by ``(N, C', HW)``, or for the folded
        dot-product form a per-sample ``(N, C, C)`` map of x itself. A batch norm in eval mode is
        an affine map and is folded into the weight (one pass over the output less). On an empty
        batch a training-mode batch norm has no statistics and is skipped, except a SyncBN that
        synchronises, which must join the collective calls.
        """
        norm = self.out_norm
        if norm is None:
            return linear(weight, bias, inputs).view(shape)
        if not self.training and hasattr(norm, "running_var"):
            mean, var, gamma, beta = norm.running_mean, norm.running_var, norm.weight, norm.bias
            if mean is not None and var is not None and gamma is not None and beta is not None:
                scale = gamma * torch.rsqrt(var + norm.eps)
                folded_bias = beta - mean * scale
                if bias is not None:
                    folded_bias = folded_bias + bias * scale
                # rows (output channels) of the weight scaled by the norm
                return linear(weight * scale[:, None], folded_bias, inputs).view(shape)
        # (N, C_in, HW) -> (N, C, HW) -> (N, C, *S)
        z = linear(weight, bias, inputs).view(shape)
        if (
            inputs.shape[0] == 0
            and self.training
            and self._batch_norm
            and not (self._sync_norm and self._synchronising())
        ):
            # Keep gamma and beta in the autograd graph (zero gradients) for DDP.
            return z + 0.0 * (norm.weight.sum() + norm.bias.sum())
        return norm(z)

    @torch.jit.unused
    def _synchronising(self) -> bool:
        """Whether a SyncBN ``out_norm`` synchronises statistics across processes now."""
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    # ----------------------------------------------------------------------------------------

    @torch.jit.unused
    def affinity(
        self, x: Tensor, query_index: Tensor, term: str = "all"
    ) -> tuple[Tensor, list[int]]:
        """Normalised affinities ``f(x_i, x_j) / C(x)`` for chosen queries i (for visualisation).

        Args:
            x: ``(N, C, *S)`` input of the block.
            query_index: ``(Q,)`` integer indices into the flattened ``S`` (row-major order).
            term: ``"all"``; for the disentangled form also ``"pairwise"`` (its whitened term)
                or ``"unary"`` (its query-independent term), each summing to 1 over the keys.

        Returns:
            A ``(N, Q, M)`` tensor (float32 for half inputs), one row per query over the M key
            positions (softmax rows for the Gaussian forms, which sum to 1; ``f / M`` for the
            other two), and the key grid ``S'`` as a list (``M = prod(S')``; sub-sampled when
            ``sub_sample``). Only these Q rows are computed, never the full map, in float32
            also under autocast.
        """
        self._check_input(x)
        terms = ("all", "pairwise", "unary") if self.pairwise == "disentangled" else ("all",)
        if term not in terms:
            raise ValueError(f"term {term!r} of a {self.pairwise} block; valid ones are {terms}.")
        return float32_region(self._affinity, x, query_index, term)

    @torch.jit.unused
    def _affinity(self, x: Tensor, query_index: Tensor, term: str) -> tuple[Tensor, list[int]]:
        # (N, C, *S) -> (N, C, HW)
        flat = x.flatten(2)
        keys, _, key_shape = self._keys_values(x, flat)
        # every query embedded (the disentangled form whitens by their mean), Q of them kept
        queries = self.pairwise_fn.embed_queries(
            flat, self._theta_weight(), self._theta_bias(), self._w_f()
        )
        queries = queries[..., query_index.to(device=x.device, dtype=torch.long)]
        if term != "all":
            pairwise, unary = self.pairwise_fn.terms(queries, keys)
            return (pairwise if term == "pairwise" else unary), key_shape
        return self.pairwise_fn.rows(queries, keys, self._w_f()), key_shape
