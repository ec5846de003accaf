"""The four pairwise functions f of the non-local block (paper Sec. 3.2), each computed without
materialising the ``HW x M`` pairwise map.

Each is a parameter-free module: the block owns the weights (theta, phi, g, w_f, W_z, under their
usual checkpoint names) and hands the embedded tensors over. Shapes: N batch, HW query positions,
M key positions (after sub-sampling), C the block's channels, C' the inner channels; every tensor
is channels-first, ``(N, C', L)``. Interface:

- ``embed_queries(x, theta_weight, theta_bias, w_f)``: what the form compares keys with, from the
  block's flattened input ``(N, C, HW)``;
- ``forward(queries, keys, values, w_f)``: ``y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j)``,
  ``(N, C', HW)``;
- ``rows(queries, keys, w_f)``: the normalised ``f(x_i, x_j) / C(x)`` of a few queries explicitly,
  ``(N, Q, M)``, for attention maps;
- ``folds_output(HW)`` / ``output_map(...)``: whether, and how, W_z y is computed as one map of x
  (dot product on large maps).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import fused_attention
from .mixed_precision import float32_region
from .tensor_ops import conv_matrix, pointwise, rows, upcast

__all__ = [
    "PAIRWISE_FUNCTIONS",
    "Concatenation",
    "Disentangled",
    "DotProduct",
    "EmbeddedGaussian",
    "Gaussian",
    "GlobalContext",
    "PairwiseFunction",
    "make_pairwise",
]


class PairwiseFunction(nn.Module):
    """Base of the pairwise functions (the interface in the module docstring).

    ``export`` (set by :func:`nl_detectron.layers.export_mode`, never by itself) selects plain
    matrix products over the materialised map, which tracing and ONNX record whatever the input
    size: no fused kernel, no loop whose count depends on the traced size, no sort.
    """

    uses_embeddings = True  # theta and phi; False: x itself (the Gaussian form)
    # A 1x1 conv of x to one channel, ``conv_mask``, whose logits at the key positions are the last
    # row of ``keys`` (the unary term of the disentangled form, GCNet's context mask).
    uses_unary = False
    # Its products must stay float32 under autocast (sums that fp16 would overflow or round away);
    # False: it takes half-precision inputs (fused attention accumulates in float32 itself).
    computes_in_float32 = False

    def __init__(self) -> None:
        super().__init__()
        self.export = False

    def embed_queries(
        self,
        x: Tensor,
        theta_weight: Optional[Tensor],
        theta_bias: Optional[Tensor],
        w_f: Optional[Tensor],
    ) -> Tensor:
        """theta(x_i): ``(N, C, HW) -> (N, C', HW)``."""
        assert theta_weight is not None
        return pointwise(theta_weight, theta_bias, x)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, w_f: Optional[Tensor]):
        raise NotImplementedError

    def rows(self, queries: Tensor, keys: Tensor, w_f: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def folds_output(self, positions: int) -> bool:
        return False

    def output_map(
        self,
        keys: Tensor,
        values: Tensor,
        theta_weight: Tensor,
        theta_bias: Tensor,
        w_z_weight: Tensor,
        w_z_bias: Optional[Tensor],
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        raise RuntimeError("this pairwise function does not fold W_z y into a map of x")


class _Softmax(PairwiseFunction):
    """``y_i = sum_j softmax_j(scale * q_i^T k_j) g_j`` (C(x) = sum_j f).

    Trick: fused attention (``F.scaled_dot_product_attention``, with the kernels of
    :func:`~nl_detectron.layers.attention.attention_backends`) never stores the ``HW x M`` map and
    accumulates the logits in float32 for half inputs (no fp16 overflow); its fused kernels need
    equal query and value widths, so the narrower side is zero-padded (which changes neither
    logits nor values). On CPU without autograd (inference), where the fused kernel is slower,
    two batched matrix products per block of query rows, at most ``chunk_elements`` map entries
    at a time, without padding.
    """

    def __init__(
        self, scale: float, chunk_elements: int, query_channels: int, value_channels: int
    ) -> None:
        super().__init__()
        self.scale = scale
        self.chunk_elements = chunk_elements
        # Widths of queries / keys and of values (Python ints: a trace records no shape test).
        self.query_channels, self.value_channels = query_channels, value_channels

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, w_f: Optional[Tensor]):
        return self._attend(queries, keys, values)

    def _attend(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """``sum_j softmax_j(scale q_i^T k_j) v_j``: ``(N, Cq, HW), (N, Cq, M), (N, C', M) ->
        (N, C', HW)``."""
        if self.export:
            # (N, Cq, HW)^T @ (N, Cq, M) -> (N, HW, M), softmax over M, @ (N, M, C') -> (N, HW, C')
            weights = torch.softmax(
                (upcast(queries) * self.scale).transpose(1, 2) @ upcast(keys), dim=2
            )
            return (weights @ upcast(values).transpose(1, 2)).transpose(1, 2)
        if (
            not torch.jit.is_tracing()
            and queries.device.type == "cpu"
            and not (queries.requires_grad or keys.requires_grad or values.requires_grad)
        ):
            if torch.jit.is_scripting():
                return self._in_chunks(queries, keys, values)
            # float32 products also under autocast (which would cast them back to half)
            return float32_region(self._in_chunks, queries, keys, values)
        cq, cv = self.query_channels, self.value_channels
        width = max(cq, cv)
        # (N, C', L) -> (N, 1, L, width): one attention head, positions as rows
        q = rows(queries, cq, width)[:, None]
        k = rows(keys, cq, width)[:, None]
        v = rows(values, cv, width)[:, None]
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            # the op itself: what runs it is the exported model's runtime's choice
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            y = fused_attention(q, k, v, self.scale)
        # (N, 1, HW, width) -> (N, HW, C') -> (N, C', HW)
        return y[:, 0, :, :cv].transpose(1, 2)

    def _in_chunks(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        # (N, Cq, HW) -> (N, HW, Cq), scaled once here rather than every logit
        q = (upcast(queries) * self.scale).transpose(1, 2)
        k = upcast(keys)
        # (N, C', M) -> (N, M, C')
        v = upcast(values).transpose(1, 2)
        batch, positions, m = q.shape[0], q.shape[1], k.shape[2]
        y = q.new_empty([batch, positions, v.shape[2]])
        step = max(1, self.chunk_elements // max(1, batch * m))
        for start in range(0, positions, step):
            # (N, rows, Cq) @ (N, Cq, M) -> (N, rows, M)
            weights = torch.softmax(torch.bmm(q[:, start : start + step], k), dim=2)
            # (N, rows, M) @ (N, M, C') -> (N, rows, C')
            y[:, start : start + step] = torch.bmm(weights, v)
        # (N, HW, C') -> (N, C', HW)
        return y.transpose(1, 2)

    @torch.jit.unused
    def rows(self, queries: Tensor, keys: Tensor, w_f: Optional[Tensor]) -> Tensor:
        # (N, Cq, Q)^T @ (N, Cq, M) -> (N, Q, M), scaled before the product as in forward
        logits = (upcast(queries) * self.scale).transpose(1, 2) @ upcast(keys)
        return torch.softmax(logits, dim=2)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


class EmbeddedGaussian(_Softmax):
    """``f = exp(theta(x_i)^T phi(x_j))``: self-attention (the paper's default)."""


class Gaussian(_Softmax):
    """``f = exp(x_i^T x_j)``: the raw features compared, no embedding."""

    uses_embeddings = False

    def embed_queries(
        self,
        x: Tensor,
        theta_weight: Optional[Tensor],
        theta_bias: Optional[Tensor],
        w_f: Optional[Tensor],
    ) -> Tensor:
        return x


class DotProduct(PairwiseFunction):
    """``f = theta(x_i)^T phi(x_j)``, C(x) = M.

    Trick: reassociated as ``y = (phi^T g)^T theta / M``, linear in HW and M; each factor of
    ``phi^T g`` gets ``M ** -0.5`` so that it is an average and cannot overflow fp16. On large
    maps (``HW >= 5 (C + C')``, with C' >= C/2) theta, ``K = phi^T g / M`` and W_z fold into one
    C x C map of x per sample, whose construction costs at most 5 % of the block's four 1x1
    convolutions, and which stores neither theta(x) nor y for the backward pass.
    """

    computes_in_float32 = True

    def __init__(self, channels: int, inner_channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.inner_channels = inner_channels
        self.folds = 2 * inner_channels >= channels

    def _kv(self, keys: Tensor, values: Tensor) -> Tensor:
        k, v = upcast(keys), upcast(values)
        norm = k.shape[2] ** -0.5
        # (N, C', M) @ (N, M, C') -> (N, C', C'): sum_j phi_j g_j^T / M
        return (k * norm) @ (v * norm).transpose(1, 2)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, w_f: Optional[Tensor]):
        # (N, C', C')^T @ (N, C', HW) -> (N, C', HW)
        return self._kv(keys, values).transpose(1, 2) @ upcast(queries)

    @torch.jit.unused
    def rows(self, queries: Tensor, keys: Tensor, w_f: Optional[Tensor]) -> Tensor:
        # (N, C', Q)^T @ (N, C', M) -> (N, Q, M)
        return upcast(queries).transpose(1, 2) @ upcast(keys) / keys.shape[2]

    def folds_output(self, positions: int) -> bool:
        return self.folds and positions >= 5 * (self.channels + self.inner_channels)

    def output_map(
        self,
        keys: Tensor,
        values: Tensor,
        theta_weight: Tensor,
        theta_bias: Tensor,
        w_z_weight: Tensor,
        w_z_bias: Optional[Tensor],
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        """``W_z y_i + b_z = A x_i + c`` per sample: ``y_i = K^T theta(x_i)``, so
        ``A = W_z K^T W_theta`` (N, C, C) and ``c = W_z K^T b_theta + b_z`` (N, C), in ``dtype``."""
        # (C, C') @ (N, C', C') -> (N, C, C'): W_z K^T
        left = upcast(conv_matrix(w_z_weight)) @ self._kv(keys, values).transpose(1, 2)
        # (N, C, C') @ (C', C) -> (N, C, C); (N, C, C') @ (C') -> (N, C)
        weight = left @ upcast(conv_matrix(theta_weight))
        bias = left @ upcast(theta_bias)
        if w_z_bias is not None:
            bias = bias + upcast(w_z_bias)
        return weight.to(dtype), bias.to(dtype)


class Concatenation(PairwiseFunction):
    """``f = ReLU(w_f^T [theta(x_i), phi(x_j)])``, C(x) = M.

    Trick: ``w_f^T [theta_i, phi_j] = a_i + b_j``. With the keys sorted by b, the j that pass the
    ReLU for query i are a suffix, those with ``b_j > -a_i``, so
    ``y_i = (a_i S_g(k_i) + S_bg(k_i)) / M`` where ``S_g(k)`` and ``S_bg(k)`` are suffix sums of
    ``g_j`` and ``b_j g_j`` over the sorted keys and ``k_i`` comes from a binary search:
    O((HW + M) C' + M log M + HW log M) time, O((HW + M) C') memory. ``a_i`` is computed from x
    with the folded weight ``w_1^T W_theta`` (one channel instead of C'). Float32 for half inputs.
    """

    computes_in_float32 = True

    def __init__(self, inner_channels: int) -> None:
        super().__init__()
        self.inner_channels = inner_channels

    def embed_queries(
        self,
        x: Tensor,
        theta_weight: Optional[Tensor],
        theta_bias: Optional[Tensor],
        w_f: Optional[Tensor],
    ) -> Tensor:
        """``a_i = w_1^T theta(x_i)``: ``(N, C, HW) -> (N, HW)``."""
        assert w_f is not None and theta_weight is not None and theta_bias is not None
        w_theta = upcast(w_f.flatten()[: self.inner_channels])
        # (C') @ (C', C) -> (C)
        w_a = w_theta @ upcast(conv_matrix(theta_weight))
        # (C) -> (N, 1, C); (N, 1, C) @ (N, C, HW) -> (N, 1, HW) -> (N, HW)
        a = torch.bmm(w_a.expand(x.shape[0], 1, -1), upcast(x))[:, 0]
        return a + w_theta @ upcast(theta_bias)

    def _key_terms(self, keys: Tensor, w_f: Tensor) -> Tensor:
        """``b_j = w_2^T phi(x_j)``: ``(N, C', M) -> (N, M)``."""
        w_phi = upcast(w_f.flatten()[self.inner_channels :])
        # (C') -> (N, 1, C'); (N, 1, C') @ (N, C', M) -> (N, 1, M) -> (N, M)
        return torch.bmm(w_phi.expand(keys.shape[0], 1, -1), upcast(keys))[:, 0]

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, w_f: Optional[Tensor]):
        assert w_f is not None
        if self.export:
            # (N, HW, M) @ (N, M, C') -> (N, HW, C') -> (N, C', HW)
            f = self.rows(queries, keys, w_f)
            return (f @ upcast(values).transpose(1, 2)).transpose(1, 2)
        a, b = queries, self._key_terms(keys, w_f)
        # (N, C', M) -> (N, M, C')
        v = upcast(values).transpose(1, 2)
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

    @torch.jit.unused
    def rows(self, queries: Tensor, keys: Tensor, w_f: Optional[Tensor]) -> Tensor:
        assert w_f is not None
        b = self._key_terms(keys, w_f)
        # (N, Q, 1) + (N, 1, M) -> (N, Q, M)
        return F.relu(queries[:, :, None] + b[:, None, :]) / keys.shape[2]


class Disentangled(_Softmax):
    """The disentangled non-local block (Yin et al., ECCV 2020): a whitened pairwise term and a
    unary term, each a softmax over the keys,

        ``f_ij = softmax_j(s / T (theta_i - mu_theta)^T (phi_j - mu_phi))
        + softmax_j(w_m^T x_j)``

    with s the logit scale, the means over the query and the key positions of each sample, T the
    temperature (0.05 in the authors' code) and ``w_m`` the block's ``conv_mask``. The authors
    find that the whitened term learns relations between positions (within regions), while the
    unary term carries the query-independent saliency that otherwise swamps it (GCNet's global
    context). Each term is normalised: it sums to 1 over j.

    Trick: the pairwise term is fused attention on whitened queries and keys (never the
    ``HW x M`` map); the unary term is one ``(C', M) @ (M,)`` product per sample, the same for
    every query. ``keys`` is ``(N, C' + 1, M)``: phi and, last, the unary logits.
    """

    uses_unary = True

    def __init__(
        self,
        scale: float,
        temperature: float,
        chunk_elements: int,
        query_channels: int,
        value_channels: int,
    ) -> None:
        super().__init__(scale / temperature, chunk_elements, query_channels, value_channels)
        self.temperature = temperature

    def embed_queries(
        self,
        x: Tensor,
        theta_weight: Optional[Tensor],
        theta_bias: Optional[Tensor],
        w_f: Optional[Tensor],
    ) -> Tensor:
        """``theta(x_i) - mu_theta`` over all positions of ``x``: ``(N, C, HW) -> (N, C', HW)``."""
        assert theta_weight is not None
        queries = pointwise(theta_weight, theta_bias, x)
        return queries - queries.mean(dim=2, keepdim=True)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, w_f: Optional[Tensor]):
        phi, unary = self._split(keys)
        # whitened pairwise term + unary term: (N, C', HW) + (N, C', 1)
        return self._attend(queries, phi, values) + _softmax_average(unary, values)

    def _split(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C' + 1, M) -> (N, C', M)`` whitened phi and ``(N, M)`` unary logits."""
        phi = keys[:, : self.query_channels]
        return phi - phi.mean(dim=2, keepdim=True), keys[:, self.query_channels]

    @torch.jit.unused
    def rows(self, queries: Tensor, keys: Tensor, w_f: Optional[Tensor]) -> Tensor:
        """The mean of the two terms (rows summing to 1): ``(N, Q, M)``."""
        pairwise, unary = self.terms(queries, keys)
        return (pairwise + unary) / 2

    @torch.jit.unused
    def terms(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """The whitened pairwise term ``(N, Q, M)`` and the unary term ``(N, Q, M)`` (the same row
        for every query), each summing to 1 over the keys."""
        phi, unary = self._split(keys)
        pairwise = super().rows(queries, phi, None)
        unary = torch.softmax(upcast(unary), dim=1)
        return pairwise, unary[:, None, :].expand_as(pairwise)

    def extra_repr(self) -> str:
        return f"scale={self.scale * self.temperature:.4g}, temperature={self.temperature:g}"


class GlobalContext(PairwiseFunction):
    """The query-independent control: GCNet's simplified non-local block (Cao et al., 2019),
    ``f_ij = softmax_j(w_m^T x_j)``, the same weights for every query i, ``C(x) = 1``; W_z and the
    norm follow as in the other forms.

    What a non-local block computes when its attention does not depend on the query (GCNet's
    finding on COCO): one context vector per image. A relation between positions is what the
    other forms can compute and this one cannot. ``keys`` is ``(N, 1, M)``: the logits of the
    block's ``conv_mask``; no theta or phi.
    """

    uses_embeddings = False
    uses_unary = True

    def embed_queries(
        self,
        x: Tensor,
        theta_weight: Optional[Tensor],
        theta_bias: Optional[Tensor],
        w_f: Optional[Tensor],
    ) -> Tensor:
        """Only the number of query positions matters: ``(N, C, HW) -> (N, 0, HW)``."""
        return x[:, :0]

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor, w_f: Optional[Tensor]):
        # (N, C', 1) -> (N, C', HW): one context vector, the same at every position
        context = _softmax_average(keys[:, 0], values)
        return context.expand(-1, -1, queries.shape[2])

    @torch.jit.unused
    def rows(self, queries: Tensor, keys: Tensor, w_f: Optional[Tensor]) -> Tensor:
        weights = torch.softmax(upcast(keys[:, 0]), dim=1)
        return weights[:, None, :].expand(-1, queries.shape[2], -1)


def _softmax_average(logits: Tensor, values: Tensor) -> Tensor:
    """``sum_j softmax_j(logits_j) v_j``: ``(N, M), (N, C', M) -> (N, C', 1)``."""
    weights = torch.softmax(upcast(logits), dim=1)
    # (N, C', M) @ (N, M, 1) -> (N, C', 1)
    return upcast(values) @ weights.unsqueeze(2)


PAIRWISE_FUNCTIONS = (
    "embedded_gaussian",
    "gaussian",
    "dot_product",
    "concatenation",
    "disentangled",
    "global_context",
)


def make_pairwise(
    name: str,
    channels: int,
    inner_channels: int,
    scale: Optional[float],
    chunk_elements: int,
    temperature: float = 0.05,
) -> PairwiseFunction:
    """The pairwise function ``name`` of a block with ``channels`` and ``inner_channels``;
    ``scale`` None is the released code's default (``C' ** -0.5``, or ``C ** -0.5`` for the
    Gaussian form, whose logits are dot products of raw C-channel features); ``temperature``
    divides the whitened logits of the disentangled form."""
    if name == "embedded_gaussian":
        scale = inner_channels**-0.5 if scale is None else scale
        return EmbeddedGaussian(scale, chunk_elements, inner_channels, inner_channels)
    if name == "disentangled":
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got temperature={temperature}.")
        scale = inner_channels**-0.5 if scale is None else scale
        return Disentangled(scale, temperature, chunk_elements, inner_channels, inner_channels)
    if name == "global_context":
        return GlobalContext()
    if name == "gaussian":
        scale = channels**-0.5 if scale is None else scale
        return Gaussian(scale, chunk_elements, channels, inner_channels)
    if name == "dot_product":
        return DotProduct(channels, inner_channels)
    if name == "concatenation":
        return Concatenation(inner_channels)
    raise ValueError(
        f"Unknown pairwise function {name!r} for NonLocalBlock; valid ones are "
        f"{PAIRWISE_FUNCTIONS}."
    )
