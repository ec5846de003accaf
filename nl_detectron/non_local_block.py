"""The non-local block of "Non-local Neural Networks" (Wang et al., CVPR 2018), Sec. 3.

    y_i = 1 / C(x) * sum_j f(x_i, x_j) g(x_j)        z_i = W_z y_i + x_i        (Eq. 1 and 6)

Shapes: N is the batch (as in detectron2), HW the number of query positions (all spatial
positions, whatever ``dim``), M the number of key positions after sub-sampling, C the block's
channels and C' the inner channels. The four pairwise functions f of Sec. 3.2 are computed without
materialising the HW x M pairwise map (at most 2^24 of its entries at a time):

- embedded Gaussian / Gaussian: fused attention (``F.scaled_dot_product_attention``); on CPU
  without autograd (inference), two matrix products per block of query rows, the map's block
  at most 2^24 entries;
- dot product: reassociated as ``theta (phi^T g) / M``, linear in HW and M; on large maps
  theta, ``phi^T g`` and W_z folded into one C x C map of x per sample;
- concatenation: ``ReLU(a_i + b_j)`` summed over j becomes two suffix sums over the keys sorted by
  ``b_j``, looked up with a binary search: O((HW + M) C' + M log M + HW log M) time and
  O((HW + M) C') memory.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sync_batch_norm import SyncBatchNorm

try:
    from detectron2.layers import CNNBlockBase
except ImportError:  # detectron2 is optional for the block itself

    class CNNBlockBase(nn.Module):
        """Stand-in for ``detectron2.layers.CNNBlockBase`` when detectron2 is not installed.

        A CNN block with ``in_channels``, ``out_channels`` and ``stride`` attributes and a
        ``freeze()`` method, as detectron2's ResNet stages expect.
        """

        def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
            super().__init__()
            self.in_channels = in_channels
            self.out_channels = out_channels
            self.stride = stride

        def freeze(self) -> "CNNBlockBase":
            """Make the block not trainable (detectron2 also converts BN to FrozenBN here)."""
            for p in self.parameters():
                p.requires_grad = False
            return self


__all__ = ["NonLocalBlock"]

_PAIRWISE = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
_NORMS = ("BN", "SyncBN", "GN", "")
_INPUT_LAYOUT = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, T, H, W)"}


def _shape_str(shape: list[int]) -> str:
    """``str(tuple(shape))``, also under TorchScript."""
    items = [str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _upcast(t: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; other dtypes unchanged."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return t.float()
    return t


def _matrix(conv_weight: Tensor) -> Tensor:
    """A 1x1(x1) convolution's weight as a matrix: ``(C_out, C_in, 1, ...) -> (C_out, C_in)``."""
    return conv_weight.flatten(1)


def _pointwise(weight: Tensor, bias: Optional[Tensor], flat: Tensor) -> Tensor:
    """A 1x1(x1) convolution as one matrix product: ``(N, C_in, L) -> (N, C_out, L)``.

    Also accepts ``flat`` as a transposed view. On CPU this runs at about twice the speed of
    the equivalent ``conv2d`` and keeps every tensor, and every gradient, channels-first like x.
    """
    return _linear(_matrix(weight), bias, flat)


def _linear(weight: Tensor, bias: Optional[Tensor], flat: Tensor) -> Tensor:
    """``(N, C_in, L) -> (N, C_out, L)`` by a ``(C_out, C_in)`` or per-sample ``(N, C_out, C_in)``
    weight and a ``(C_out)`` or ``(N, C_out)`` bias (or None)."""
    if weight.dim() == 2:
        # (C_out, C_in) -> (N, C_out, C_in), a view: a batched product copies neither operand
        # (torch.matmul would fold the batch into a transposed copy of flat)
        weight = weight.expand(flat.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(weight, flat)
    # (..., C_out) -> (..., C_out, 1); + (N, C_out, C_in) @ (N, C_in, L) -> (N, C_out, L)
    return torch.baddbmm(bias.unsqueeze(-1), weight, flat)


def _rows(t: Tensor, width: int) -> Tensor:
    """Channels-first to rows, zero-padded to ``width`` channels: ``(N, C, L) -> (N, L, width)``.

    Contiguous, as fused attention needs a unit stride along the channels.
    """
    # (N, C, L) -> (N, L, C)
    rows = t.transpose(1, 2)
    if rows.shape[2] < width:
        rows = F.pad(rows, [0, width - rows.shape[2]])
    return rows.contiguous()


class _MaxPoolKeepingIndices(torch.autograd.Function):
    """Max-pooling over non-overlapping windows whose backward keeps only int32 indices.

    ``F.max_pool*d`` saves its input and int64 indices for the backward pass; with windows equal
    to the stride each input position receives the gradient of at most one output, so the
    indices alone give the gradient (a scatter), identical to PyTorch's. At res3 of a COCO image
    this takes about 80 MB off the peak of a forward + backward pass.
    """

    @staticmethod
    def forward(ctx, t: Tensor, window: list[int]) -> Tensor:  # type: ignore[override]
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(window) - 1]
        out, indices = pool(t, window, window, 0, 1, True, True)
        ctx.input_shape = t.shape
        ctx.save_for_backward(indices.to(torch.int32))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        shape = ctx.input_shape
        # (N, C, *S') -> (N, C, M) scattered into (N, C, prod(S)): the indices are per plane
        grad_input = grad.new_zeros(shape[0], shape[1], math.prod(shape[2:]))
        grad_input.scatter_(2, indices.flatten(2).long(), grad.flatten(2))
        return grad_input.view(shape), None


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
        # Its class is not nn.SyncBatchNorm, which DDP refuses in CPU models.
        return SyncBatchNorm(channels)
    if norm == "GN":
        if channels % 32 != 0:
            raise ValueError(
                f"NonLocalBlock with norm='GN' uses GroupNorm with 32 groups, so in_channels must "
                f"be divisible by 32; got in_channels={channels}."
            )
        return nn.GroupNorm(32, channels)
    raise ValueError(f"Unknown norm {norm!r} for NonLocalBlock; valid norms are {_NORMS}.")


class NonLocalBlock(CNNBlockBase):
    """Non-local block (paper Sec. 3.3, Fig. 2) for 1D, 2D or spatio-temporal 3D feature maps.

    Input and output: ``(N, C, L)`` for ``dim=1``, ``(N, C, H, W)`` for ``dim=2``,
    ``(N, C, T, H, W)`` for ``dim=3``; the output has the input's shape and the block is an exact
    identity at construction (the last norm's gamma, or ``W_z`` without a norm, is zero).

    Args:
        in_channels: C, channels of the input and output.
        dim: 1, 2 or 3 spatial dimensions.
        pairwise: ``"embedded_gaussian"`` (default, the paper's), ``"gaussian"``,
            ``"dot_product"`` or ``"concatenation"`` (Sec. 3.2).
        inner_channels: C', channels of theta, phi and g; default ``in_channels // 2`` (Sec. 3.3).
        sub_sample: max-pool phi and g by 2 (1D), 2x2 (2D) or 1x2x2 (3D) (Sec. 3.3). Pooling
            uses ``ceil_mode`` so odd sizes keep their last row and sizes of 1 are not pooled.
        scale: factor on the logits of the two Gaussian forms. None means ``C' ** -0.5`` for the
            embedded Gaussian (the released code's default) and ``C ** -0.5`` for the Gaussian,
            whose logits are dot products of raw C-channel features; 1.0 is the paper's formula.
            Ignored by dot product and concatenation.
        norm: ``"BN"``, ``"SyncBN"``, ``"GN"`` (32 groups) or ``""``/None, after ``W_z``.
            ``"FrozenBN"`` is refused: with gamma 0 it would keep the block a no-op.
        init_std: std of the Gaussian init of the 1x1 convs (released code: 0.01); None: MSRA
            (He) init, the paper's (Sec. 4.1), whose scale does not depend on the widths.

    Submodules: ``theta``, ``phi`` (None for the Gaussian form, which uses x itself), ``g``,
    ``concat_project`` (w_f of the concatenation form, else None), ``out_conv`` (W_z) and
    ``out_norm`` (None without a norm). The 1x1 convolutions are stored as ``nn.Conv{1,2,3}d``
    (the usual checkpoint layout) but applied as matrix products over the flattened positions,
    the same arithmetic and faster on CPU; their forward hooks therefore do not run.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        dim: int = 2,
        pairwise: str = "embedded_gaussian",
        inner_channels: Optional[int] = None,
        sub_sample: bool = True,
        scale: Optional[float] = None,
        norm: Optional[str] = "BN",
        init_std: Optional[float] = 0.01,
    ) -> None:
        super().__init__(in_channels, in_channels, 1)
        if dim not in (1, 2, 3):
            raise ValueError(f"NonLocalBlock supports dim 1, 2 or 3; got dim={dim!r}.")
        if pairwise not in _PAIRWISE:
            raise ValueError(
                f"Unknown pairwise function {pairwise!r} for NonLocalBlock; "
                f"valid ones are {_PAIRWISE}."
            )
        if inner_channels is None:
            inner_channels = in_channels // 2
        if inner_channels <= 0:
            raise ValueError(
                f"NonLocalBlock needs a positive number of inner channels; got "
                f"inner_channels={inner_channels} (in_channels={in_channels})."
            )
        if scale is not None and scale <= 0:
            raise ValueError(f"NonLocalBlock scale must be positive or None; got scale={scale}.")
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        gaussian_forms = pairwise in ("embedded_gaussian", "gaussian")

        self.dim = dim
        self._input_layout = _INPUT_LAYOUT[dim]
        self.pairwise = pairwise
        self.inner_channels = inner_channels
        self.sub_sample = sub_sample
        if gaussian_forms and scale is None:
            scale = (in_channels if pairwise == "gaussian" else inner_channels) ** -0.5
        self.scale = scale if gaussian_forms else None
        # Inference on CPU (softmax forms): entries of the pairwise map computed at once, 64 MB
        # in float32; see _softmax_in_chunks.
        self.inference_chunk_elements = 1 << 24
        # Dot product: theta and W_z folded into one C x C map per sample on large inputs; see
        # _folds_dot_product.
        self._fold_dot_product = pairwise == "dot_product" and 2 * inner_channels >= in_channels

        # The Gaussian form compares raw features x_i^T x_j: no embedding (Sec. 3.2).
        self.theta = None if pairwise == "gaussian" else conv(in_channels, inner_channels, 1)
        self.phi = None if pairwise == "gaussian" else conv(in_channels, inner_channels, 1)
        self.g = conv(in_channels, inner_channels, 1)
        # w_f of ReLU(w_f^T [theta_i, phi_j]), a 1x1 conv from the 2C' concatenated channels.
        self.concat_project = (
            conv(2 * inner_channels, 1, 1, bias=False) if pairwise == "concatenation" else None
        )
        self.out_norm = _make_norm(norm, in_channels, dim)
        self.out_conv = conv(inner_channels, in_channels, 1, bias=self.out_norm is None)
        # On an empty batch a training-mode batch norm has no statistics: it is skipped there,
        # except a SyncBN that synchronises, which must join the other processes' collectives.
        self._batch_norm = isinstance(self.out_norm, nn.modules.batchnorm._BatchNorm)
        self._sync_norm = isinstance(self.out_norm, SyncBatchNorm)

        for layer in (self.theta, self.phi, self.g, self.concat_project, self.out_conv):
            if layer is not None:
                if init_std is None:
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.normal_(layer.weight, std=init_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        # Zero-init last (Sec. 4.1): the block starts as an identity, so inserting it into a
        # pretrained network keeps that network's behaviour.
        if self.out_norm is not None:
            nn.init.zeros_(self.out_norm.weight)
        else:
            nn.init.zeros_(self.out_conv.weight)
            nn.init.zeros_(self.out_conv.bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, pairwise={self.pairwise!r}, inner_channels={self.inner_channels}, "
            f"sub_sample={self.sub_sample}, scale={self.scale}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, *S) -> (N, C, *S)``: ``x + norm(W_z y)`` with y of Eq. 1."""
        self._check_input(x)
        # (N, C, *S) -> (N, C, HW), a view
        flat = x.flatten(2)
        keys, values, _ = self._keys_values(x, flat)
        if self.pairwise == "dot_product" and self._folds_dot_product(flat.shape[2]):
            # W_z y as one map of x itself
            weight, bias = self._dot_product_map(keys, values, x.dtype)
            z = self._output(flat, list(x.shape), weight, bias)
        else:
            if self.pairwise == "concatenation":
                y = self._concatenation(self._concat_query_terms(flat), keys, values)
            elif self.pairwise == "dot_product":
                y = self._dot_product(self._queries(flat), keys, values)
            else:
                y = self._softmax(self._queries(flat), keys, values)
            w_z = self.out_conv
            z = self._output(y.to(x.dtype), list(x.shape), _matrix(w_z.weight), w_z.bias)
        if z.dtype != x.dtype:  # autocast
            return x + z
        # In place: neither the norm nor W_z keeps its output for the backward pass.
        return z.add_(x)

    def _output(
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
            return _linear(weight, bias, inputs).view(shape)
        if not self.training and hasattr(norm, "running_var"):
            mean, var, gamma, beta = norm.running_mean, norm.running_var, norm.weight, norm.bias
            if mean is not None and var is not None and gamma is not None and beta is not None:
                scale = gamma * torch.rsqrt(var + norm.eps)
                folded_bias = beta - mean * scale
                if bias is not None:
                    folded_bias = folded_bias + bias * scale
                # rows (output channels) of the weight scaled by the norm
                return _linear(weight * scale[:, None], folded_bias, inputs).view(shape)
        # (N, C_in, HW) -> (N, C, HW) -> (N, C, *S)
        z = _linear(weight, bias, inputs).view(shape)
        if (
            inputs.shape[0] == 0
            and self.training
            and self._batch_norm
            and not (self._sync_norm and self._synchronising())
        ):
            # Keep gamma and beta in the autograd graph (zero gradients) for DDP.
            return z + 0.0 * (norm.weight.sum() + norm.bias.sum())
        return norm(z)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"NonLocalBlock(dim={self.dim}) takes an input of shape "
                f"{self._input_layout}. Got {_shape_str(x.shape)} instead!"
            )

    @torch.jit.unused
    def _synchronising(self) -> bool:
        """Whether a SyncBN ``out_norm`` synchronises statistics across processes now."""
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    # ----------------------------------------------------------------------------------------
    # Embeddings, channels first like x: (N, C, HW) with batch N, HW query positions (all of
    # *S), M key positions after sub-sampling, C' inner channels.

    def _queries(self, flat: Tensor) -> Tensor:
        """theta(x_i), or x_i for the Gaussian form: ``(N, C, HW) -> (N, C', HW)``."""
        if self.theta is None:
            return flat
        return _pointwise(self.theta.weight, self.theta.bias, flat)

    def _keys_values(self, x: Tensor, flat: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Sub-sampled phi(x_j) (x_j for the Gaussian form) and g(x_j).

        ``(N, C, *S), (N, C, HW) -> (N, C', M), (N, C', M)`` and the sub-sampled grid ``S'``,
        ``M = prod(S')``.
        """
        if self.phi is None:
            # (N, C', HW) -> (N, C', *S)
            values = _pointwise(self.g.weight, self.g.bias, flat).view(
                [x.shape[0], self.inner_channels] + list(x.shape[2:])
            )
            keys = x
            if self.sub_sample:
                keys, values = self._pool(keys), self._pool(values)
            # (N, C, *S') -> (N, C, M)
            return keys.flatten(2), values.flatten(2), list(values.shape[2:])
        # phi and g in one product: (N, C, HW) -> (N, 2C', HW) -> (N, 2C', *S)
        phi_bias, g_bias = self.phi.bias, self.g.bias
        assert phi_bias is not None and g_bias is not None
        weight = torch.cat([self.phi.weight, self.g.weight])
        both = _pointwise(weight, torch.cat([phi_bias, g_bias]), flat)
        both = both.view([x.shape[0], 2 * self.inner_channels] + list(x.shape[2:]))
        if self.sub_sample:
            both = self._pool(both)
        key_shape = list(both.shape[2:])
        # (N, 2C', *S') -> (N, 2C', M) -> (N, C', M) x 2
        both = both.flatten(2)
        return both[:, : self.inner_channels], both[:, self.inner_channels :], key_shape

    def _pool(self, t: Tensor) -> Tensor:
        """Max-pool by 2 (1D), 2x2 (2D) or 1x2x2 (3D), ceil mode (partial windows kept)."""
        if not torch.jit.is_scripting() and t.requires_grad and torch.is_grad_enabled():
            return self._pool_keeping_indices(t)
        if self.dim == 1:
            return F.max_pool1d(t, 2, 2, 0, 1, True)
        if self.dim == 2:
            return F.max_pool2d(t, 2, 2, 0, 1, True)
        return F.max_pool3d(t, [1, 2, 2], [1, 2, 2], 0, 1, True)

    @torch.jit.unused
    def _pool_keeping_indices(self, t: Tensor) -> Tensor:
        """:meth:`_pool` for autograd, saving int32 indices only (see _MaxPoolKeepingIndices)."""
        window = [2] if self.dim == 1 else [2, 2] if self.dim == 2 else [1, 2, 2]
        return _MaxPoolKeepingIndices.apply(t, window)

    def _concat_query_terms(self, flat: Tensor) -> Tensor:
        """``a_i = w_1^T theta(x_i)`` of ``w_f^T [theta_i, phi_j] = a_i + b_j``: ``(N, HW)``.

        Computed from x with the folded weight ``w_1^T W_theta`` (one output channel instead of
        C'), in float32 for half inputs.
        """
        assert self.concat_project is not None and self.theta is not None
        theta_bias = self.theta.bias
        assert theta_bias is not None
        w_theta = _upcast(self.concat_project.weight.flatten()[: self.inner_channels])
        # (C') @ (C', C) -> (C)
        w_a = w_theta @ _upcast(_matrix(self.theta.weight))
        # (C) -> (N, 1, C); (N, 1, C) @ (N, C, HW) -> (N, 1, HW) -> (N, HW)
        a = torch.bmm(w_a.expand(flat.shape[0], 1, -1), _upcast(flat))[:, 0]
        return a + w_theta @ _upcast(theta_bias)

    def _concat_key_terms(self, keys: Tensor) -> Tensor:
        """``b_j = w_2^T phi(x_j)``: ``(N, C', M) -> (N, M)``, float32 for half inputs."""
        assert self.concat_project is not None
        w_phi = _upcast(self.concat_project.weight.flatten()[self.inner_channels :])
        # (C') -> (N, 1, C'); (N, 1, C') @ (N, C', M) -> (N, 1, M) -> (N, M)
        return torch.bmm(w_phi.expand(keys.shape[0], 1, -1), _upcast(keys))[:, 0]

    # ----------------------------------------------------------------------------------------
    # Pairwise functions (Sec. 3.2). Each maps the queries (N, Cq, HW), keys (N, Ck, M) and
    # values (N, C', M) to y (N, C', HW), with the normalisation C(x) applied.

    def _softmax(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Embedded Gaussian and Gaussian: ``y_i = sum_j softmax_j(scale * q_i^T k_j) g_j``.

        Fused attention never stores the ``HW x M`` map and accumulates the logits in float32 for
        half inputs (no fp16 overflow). Its fused kernels need equal query and value widths, so
        the narrower side is zero-padded (which changes neither logits nor values).
        """
        if queries.device.type == "cpu" and not (
            queries.requires_grad or keys.requires_grad or values.requires_grad
        ):
            return self._softmax_in_chunks(queries, keys, values)
        width = max(queries.shape[1], values.shape[1])
        # (N, C', L) -> (N, 1, L, width): one attention head, positions as rows
        q = _rows(queries, width)[:, None]
        k = _rows(keys, width)[:, None]
        v = _rows(values, width)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # (N, 1, HW, width) -> (N, HW, C') -> (N, C', HW)
        return y[:, 0, :, : values.shape[1]].transpose(1, 2)

    def _softmax_in_chunks(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """The softmax forms without autograd on CPU (inference): blocks of query rows.

        Two batched matrix products per block, at the CPU's full matrix-product speed and with
        no zero padding, where the fused kernel is slower on CPU; the map exists one block of at
        most ``inference_chunk_elements`` entries at a time. Float32 for half inputs.
        """
        scale = self.scale
        assert scale is not None
        # (N, Cq, HW) -> (N, HW, Cq), scaled once here rather than every logit
        q = (_upcast(queries) * scale).transpose(1, 2)
        k = _upcast(keys)
        # (N, C', M) -> (N, M, C')
        v = _upcast(values).transpose(1, 2)
        batch, positions, m = q.shape[0], q.shape[1], k.shape[2]
        y = q.new_empty([batch, positions, v.shape[2]])
        rows = max(1, self.inference_chunk_elements // max(1, batch * m))
        for start in range(0, positions, rows):
            # (N, rows, Cq) @ (N, Cq, M) -> (N, rows, M)
            weights = torch.softmax(torch.bmm(q[:, start : start + rows], k), dim=2)
            # (N, rows, M) @ (N, M, C') -> (N, rows, C')
            y[:, start : start + rows] = torch.bmm(weights, v)
        # (N, HW, C') -> (N, C', HW)
        return y.transpose(1, 2)

    def _dot_product(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Dot product: ``y = (phi^T g)^T theta / M``, the reassociated ``g (phi^T theta) / M``.

        Each factor of ``phi^T g`` gets ``M ** -0.5``, so that it is an average and cannot
        overflow fp16 even where autocast keeps the product in half precision.
        """
        q, k, v = _upcast(queries), _upcast(keys), _upcast(values)
        norm = k.shape[2] ** -0.5
        # (N, C', M) @ (N, M, C') -> (N, C', C'): sum_j phi_j g_j^T / M
        kv = (k * norm) @ (v * norm).transpose(1, 2)
        # (N, C', C')^T @ (N, C', HW) -> (N, C', HW)
        return kv.transpose(1, 2) @ q

    def _folds_dot_product(self, positions: int) -> bool:
        """Whether the dot-product form folds theta and W_z (see :meth:`_dot_product_map`).

        Applying the folded C x C map costs what theta and W_z cost when C' = C/2 (used while
        C' >= C/2); building it costs ``C C' (C + C')`` multiply-adds per sample, which is at
        most 5% of the block's four 1x1 convolutions (``4 C C' HW``) when
        ``HW >= 5 (C + C')``: large maps (res3 of a COCO image: 16,800 >= 3,840), not RoI heads.
        The fold stores neither theta(x) nor y for the backward pass.
        """
        return self._fold_dot_product and positions >= 5 * (self.in_channels + self.inner_channels)

    def _dot_product_map(
        self, keys: Tensor, values: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Dot product folded with theta and W_z: ``W_z y_i + b_z = A x_i + c`` per sample.

        ``y_i = K^T theta(x_i)`` with ``K = sum_j phi_j g_j^T / M`` (C' x C'), so
        ``W_z y_i = (W_z K^T W_theta) x_i + W_z K^T b_theta``: a C x C matrix per sample, built
        from C x C' x C' products; neither theta(x) nor y is kept for the backward pass. Returns
        ``A`` (N, C, C) and ``c`` (N, C) in ``dtype``.
        """
        theta, w_z = self.theta, self.out_conv
        assert theta is not None
        theta_bias = theta.bias
        assert theta_bias is not None
        k, v = _upcast(keys), _upcast(values)
        norm = k.shape[2] ** -0.5
        # (N, C', M) @ (N, M, C') -> (N, C', C'): K, each factor scaled as in _dot_product
        kv = (k * norm) @ (v * norm).transpose(1, 2)
        # (C, C') @ (N, C', C') -> (N, C, C'): W_z K^T
        left = _upcast(_matrix(w_z.weight)) @ kv.transpose(1, 2)
        # (N, C, C') @ (C', C) -> (N, C, C); (N, C, C') @ (C') -> (N, C)
        weight = left @ _upcast(_matrix(theta.weight))
        bias = left @ _upcast(theta_bias)
        w_z_bias = w_z.bias
        if w_z_bias is not None:
            bias = bias + _upcast(w_z_bias)
        return weight.to(dtype), bias.to(dtype)

    def _concatenation(self, a: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Concatenation: ``y_i = 1/M sum_j ReLU(a_i + b_j) g_j`` without the ``HW x M`` map.

        With the keys sorted by b, the j that pass the ReLU for query i are a suffix, those with
        ``b_j > -a_i``, so ``y_i = (a_i S_g(k_i) + S_bg(k_i)) / M`` where ``S_g(k)`` and
        ``S_bg(k)`` are the sums of ``g_j`` and ``b_j g_j`` over sorted keys ``k..M-1`` and
        ``k_i`` is found by binary search. Differentiable in a, b and g; float32 for half inputs.
        """
        b = self._concat_key_terms(keys)
        # (N, C', M) -> (N, M, C')
        v = _upcast(values).transpose(1, 2)
        m, width = v.shape[1], v.shape[2]
        b_sorted, order = b.sort(dim=1)
        # (N, M) -> (N, M, C'): g reordered like the sorted b
        v_sorted = v.gather(1, order.unsqueeze(2).expand(-1, -1, width))
        # (N, M, C') x 2 -> (N, M, 2C'): [g_j, b_j g_j]
        terms = torch.cat([v_sorted, b_sorted.unsqueeze(2) * v_sorted], dim=2)
        # Suffix sums by a cumsum of the reversed order (no cancellation), then a zero row for
        # queries that no key passes: (N, M, 2C') -> (N, M + 1, 2C')
        suffix = F.pad(terms.flip(1).cumsum(1).flip(1), [0, 0, 0, 1])
        first = torch.searchsorted(b_sorted, -a, right=True)
        # (N, HW) -> (N, HW, 2C'): suffix sums from each query's first passing key
        sums = suffix.gather(1, first.unsqueeze(2).expand(-1, -1, 2 * width))
        y = (a.unsqueeze(2) * sums[:, :, :width] + sums[:, :, width:]) / m
        # (N, HW, C') -> (N, C', HW)
        return y.transpose(1, 2)

    # ----------------------------------------------------------------------------------------

    @torch.jit.unused
    def affinity(self, x: Tensor, query_index: Tensor) -> tuple[Tensor, list[int]]:
        """Normalised affinities ``f(x_i, x_j) / C(x)`` for chosen queries i (for visualisation).

        Args:
            x: ``(N, C, *S)`` input of the block.
            query_index: ``(Q,)`` integer indices into the flattened ``S`` (row-major order).

        Returns:
            A ``(N, Q, M)`` tensor (float32 for half inputs), one row per query over the M key
            positions (softmax rows for the Gaussian forms, which sum to 1; ``f / M`` for the
            other two), and the key grid ``S'`` as a list (``M = prod(S')``; sub-sampled when
            ``sub_sample``). Only these Q rows are computed, never the full map.
        """
        self._check_input(x)
        # (N, C, *S) -> (N, C, HW) -> (N, C, Q)
        flat = x.flatten(2)
        chosen = flat[:, :, query_index.to(device=x.device, dtype=torch.long)]
        keys, _, key_shape = self._keys_values(x, flat)
        m = keys.shape[2]
        if self.pairwise == "concatenation":
            a, b = self._concat_query_terms(chosen), self._concat_key_terms(keys)
            # (N, Q, 1) + (N, 1, M) -> (N, Q, M)
            return F.relu(a[:, :, None] + b[:, None, :]) / m, key_shape
        # (N, C', Q)^T @ (N, C', M) -> (N, Q, M)
        logits = _upcast(self._queries(chosen)).transpose(1, 2) @ _upcast(keys)
        if self.pairwise == "dot_product":
            return logits / m, key_shape
        return torch.softmax(logits * self.scale, dim=2), key_shape
