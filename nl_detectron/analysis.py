"""What Detectron2's model analysis counts: fvcore handles for the ATen operators it lacks.

Detectron2's ``tools/analyze_model.py`` (``detectron2.utils.analysis``) counts FLOPs and
activations with fvcore: it traces one inference and adds up one handle per ATen operator; an
operator without a handle counts 0, with an "Unsupported operator" warning. fvcore 0.1.5 has no
handle for ``aten::baddbmm`` (a matrix product plus a bias: how the non-local block applies its
1x1 convolutions on the CPU) or ``aten::scaled_dot_product_attention`` (fused attention), and its
``aten::matmul`` handle fails on a 1-D operand and drops a batch dimension that only the right
operand has. So the block counted next to nothing. The handles here are for standard ATen
operators and serve every model; importing ``nl_detectron`` registers them
(:func:`register_analysis_handles`) in the tables fvcore and Detectron2 read when an analysis is
created.

What counts, fvcore's rule: one fused multiply-add is one FLOP, for matrix products and
convolutions (and fvcore's estimates for norms, upsampling and average pooling). What counts zero:

- operators with no arithmetic: padding, flipping, sorting, binary search (fvcore's own list of
  such operators has ``constant_pad_nd``, ``roll``, ``gather``, ``max``, ``ge``, ...);
- element-wise operators and reductions, which Detectron2's analysis leaves uncounted (it lists
  ``exp``, ``sqrt``, ``mul``, ``softmax``, ``sort``, ...): here ``rsqrt``, ``pow``, ``mean`` and
  ``cumsum``.

For the non-local block this is its multiply-adds: theta, phi, g, W_z (and the one-channel
``conv_mask`` of the disentangled and global-context forms), the pairwise products (the fused
attention's ``q k^T`` and ``p v``, the dot product's ``phi^T g`` and ``K^T theta``, the unary
term's weighted values) and its folds (the dot product's ``(C, C)`` map of x on large maps, the
concatenation's ``w_1^T theta``). The fused attention takes one width for queries and values, so
the Gaussian form's values are zero-padded to the C channels of its raw-feature queries; those
products run and are counted. The concatenation's sort, binary search, gathers, suffix sums and
element-wise products (``b_j g_j``, ``a_i S_g + S_bg``) count zero: ``O((HW + M) C')``
operations against the ``O(HW C C')`` of its 1x1 convolutions, under 0.5 % of the block for
``C >= 256``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from fvcore.nn.jit_handles import Handle, generic_activation_jit, get_shape, matmul_flop_jit

__all__ = [
    "ACTIVATION_HANDLES",
    "FLOP_HANDLES",
    "NO_ARITHMETIC_OPS",
    "UNCOUNTED_ELEMENTWISE_OPS",
    "attention_flop_jit",
    "batched_product_flop_jit",
    "matrix_product_flop_jit",
    "register_analysis_handles",
]


def batched_product_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``baddbmm`` / ``addbmm(input, batch1, batch2)``: ``(B, n, m) @ (B, m, p)`` is ``B n m p``
    multiply-adds (the added ``input`` is not counted, as fvcore's ``addmm`` does not count it)."""
    (batch, n, m), p = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return batch * n * m * p


def matrix_product_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``matmul(a, b)`` with NumPy's rules: a 1-D ``a`` is a row, a 1-D ``b`` a column, and the
    batch dimensions of both broadcast. ``(..., n, k) @ (..., k, p)``: ``batch n k p``."""
    a, b = (list(get_shape(v)) for v in inputs[:2])
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def attention_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``scaled_dot_product_attention(q, k, v)``, q ``(..., L, E)``, k ``(..., S, E)``,
    v ``(..., S, Ev)``: the logits ``q k^T`` and the weighted values ``p v``, ``L S (E + Ev)`` per
    batch and head (the output's, ``(..., L, Ev)``, so broadcast and grouped-query heads count
    once per query head). Dense, also with a causal mask; the softmax is not counted."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    out = get_shape(outputs[0])
    return math.prod(out[:-1]) * k[-2] * (q[-1] + v[-1])


# FLOP handles for operators fvcore 0.1.5 lacks, or (``aten::matmul``) counts wrongly.
FLOP_HANDLES: dict[str, Handle] = {
    "aten::baddbmm": batched_product_flop_jit,
    "aten::addbmm": batched_product_flop_jit,
    "aten::matmul": matrix_product_flop_jit,
    "aten::scaled_dot_product_attention": attention_flop_jit,
}
# Activation handles (the output's size, as fvcore's for bmm and matmul) for the same operators.
ACTIVATION_HANDLES: dict[str, Handle] = {
    "aten::baddbmm": generic_activation_jit(),
    "aten::addbmm": generic_activation_jit(),
    "aten::scaled_dot_product_attention": generic_activation_jit(),
}
# Operators without arithmetic, for fvcore's list of such operators (which counts them zero and
# does not warn): ``aten::pad`` is what ``F.pad`` traces to since PyTorch 2 (``constant_pad_nd``
# before, on that list); the others move or compare elements.
NO_ARITHMETIC_OPS = frozenset(
    {"aten::pad", "aten::flip", "aten::sort", "aten::argsort", "aten::searchsorted"}
)
# Element-wise operators and reductions, for Detectron2's list of those it does not count.
UNCOUNTED_ELEMENTWISE_OPS = frozenset({"aten::rsqrt", "aten::pow", "aten::mean", "aten::cumsum"})


def register_analysis_handles() -> None:
    """Add the handles to fvcore's default tables and the operator lists to fvcore's and
    Detectron2's, so that every ``FlopCountAnalysis`` / ``ActivationCountAnalysis`` created
    afterwards (fvcore's or ``detectron2.utils.analysis``'s, as ``tools/analyze_model.py`` creates
    them) uses them. A handle fvcore itself has is kept, except fvcore 0.1.5's ``aten::matmul``.
    Idempotent."""
    flop_count = importlib.import_module("fvcore.nn.flop_count")
    activation_count = importlib.import_module("fvcore.nn.activation_count")
    jit_analysis = importlib.import_module("fvcore.nn.jit_analysis")
    flop_table, activation_table = (
        flop_count._DEFAULT_SUPPORTED_OPS,
        activation_count._DEFAULT_SUPPORTED_OPS,
    )
    for name, handle in FLOP_HANDLES.items():
        if flop_table.get(name) in (None, matmul_flop_jit):
            flop_table[name] = handle
    for name, handle in ACTIVATION_HANDLES.items():
        activation_table.setdefault(name, handle)
    jit_analysis._IGNORED_OPS.update(NO_ARITHMETIC_OPS)
    try:
        detectron2_analysis = importlib.import_module("detectron2.utils.analysis")
    except ImportError:  # a Detectron2 whose export package does not import: no analysis tools
        return
    detectron2_analysis._IGNORED_OPS.update(UNCOUNTED_ELEMENTWISE_OPS)
