"""Detectron2's FLOP and activation counts (``detectron2.utils.analysis``, as ``analyze_model``
uses them) of non-local blocks against their multiply-adds counted by hand, and the handles
nl_detectron registers for the operators fvcore lacks."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators
from torch import nn

import nl_detectron  # noqa: F401  (registers the handles)
from nl_detectron.analysis import FLOP_HANDLES
from nl_detectron.layers import PAIRWISE_FUNCTIONS, NonLocalBlock
from nl_detectron.modeling import NonLocalKRCNNConvDeconvUpsampleHead

# Channels C and inner channels C' of the test blocks (the paper's ratio). The dot product folds
# theta, K and W_z into one (C, C) map from HW >= 5 (C + C') = 1920 positions: (7, 9) is below,
# (45, 43) above. Odd sizes: 2x2 pooling keeps the partial windows (ceil mode).
CHANNELS, INNER = 256, 128
SMALL, LARGE = (7, 9), (45, 43)


def block_multiply_adds(block: NonLocalBlock, batch: int, height: int, width: int) -> int:
    """The multiply-adds of one forward of ``block`` in evaluation on ``(batch, C, H, W)``, by hand.

    theta, phi, g and W_z are ``C x C'`` products per position (phi and g at every position, then
    pooled, or at the pooled ones with ``pool_input``); the pairwise products of each form as the
    block computes them (paper Sec. 3.2; the tricks in ``nl_detectron/layers/pairwise.py``):

    - Gaussian forms: fused attention over one head, ``HW M`` logits of the query width and ``HW M``
      weighted values; the kernel takes one width for both, so the Gaussian form's C' value
      channels are zero-padded to the C of its raw-feature queries, and those products run;
    - dot product: ``K = phi^T g`` (``M C'^2``) and ``K^T theta`` (``HW C'^2``); on large maps
      theta, K and W_z fold into a ``(C, C)`` map of x (``C C'^2 + C^2 C' + C C'`` per sample,
      then ``C^2`` per position instead of theta and W_z);
    - concatenation: ``a_i = (w_1^T W_theta) x_i`` (``C`` per position, the fold ``C' C + C'``
      once), ``b_j = w_2^T phi_j`` (``C'`` per key), and the sorted suffix sums combined as
      ``a_i S_g + S_bg`` (``C'`` per position) after ``b_j g_j`` (``C'`` per key);
    - disentangled: the embedded Gaussian's on whitened theta and phi, plus the unary logits
      ``w_m^T x_j`` (``C`` per position, in the product with phi and g) and their softmax average
      of g (``C'`` per key);
    - global context: ``w_m^T x_j`` and its softmax average of g only (no theta, phi or pairwise
      map), then W_z at every position.

    The batch norm after W_z is folded into W_z in evaluation. Additions without a multiply, the
    softmax, means, sorting and searching are not multiply-adds. A form without a count here fails
    the tests that use this function.
    """
    c, ci, form = block.in_channels, block.inner_channels, block.pairwise
    hw = height * width
    m = hw
    if block.sub_sample:
        m = math.ceil(height / 2) * math.ceil(width / 2)
    embedded = m if block.sub_sample and block.pool_input else hw  # where phi and g are applied
    w_z = c * ci * hw
    if form == "gaussian":
        # g only; logits of the C raw channels, values padded from C' to C
        per_sample = ci * c * embedded + hw * m * c + hw * m * max(c, ci) + w_z
    elif form == "embedded_gaussian":
        per_sample = 2 * ci * c * embedded + ci * c * hw + hw * m * (ci + ci) + w_z
    elif form == "disentangled":
        unary = c * embedded + ci * m
        per_sample = 2 * ci * c * embedded + ci * c * hw + hw * m * (ci + ci) + unary + w_z
    elif form == "global_context":
        per_sample = (1 + ci) * c * embedded + ci * m + w_z
    elif form == "dot_product":
        kv = m * ci * ci
        if block.pairwise_fn.folds_output(hw):
            fold = c * ci * ci + c * ci * c + c * ci
            per_sample = 2 * ci * c * embedded + kv + fold + c * c * hw
        else:
            per_sample = 2 * ci * c * embedded + ci * c * hw + kv + hw * ci * ci + w_z
    else:
        assert form == "concatenation", form
        a, b = c * hw, ci * m
        suffix_sums = ci * m + ci * hw
        per_sample = 2 * ci * c * embedded + a + b + suffix_sums + w_z
        return batch * per_sample + ci * c + ci  # + the fold w_1^T W_theta, w_1^T b_theta
    return batch * per_sample


def randomised(block: nn.Module) -> nn.Module:
    """Random weights and batch-norm statistics, in evaluation, as an analysed model would be."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return block.eval()


def analyzed(model: nn.Module, *inputs: torch.Tensor) -> FlopCountAnalysis:
    flops = FlopCountAnalysis(model, inputs)
    # The block applies its 1x1 convs by their weights (their forward never runs): not a defect.
    flops.uncalled_modules_warnings(False).total()  # traces and counts
    return flops


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_block_flops_are_its_multiply_adds(pairwise, size):
    block = randomised(NonLocalBlock(CHANNELS, pairwise=pairwise))
    x = torch.randn(2, CHANNELS, *size)
    flops = analyzed(block, x)
    assert flops.unsupported_ops() == {}, "every operator of the block has a handle or is ignored"
    expected = block_multiply_adds(block, *x.shape[:1], *size)
    assert flops.total() == pytest.approx(expected, rel=0.01)
    if pairwise == "dot_product":
        assert block.pairwise_fn.folds_output(size[0] * size[1]) == (size == LARGE)


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
@pytest.mark.parametrize("variant", ["pool_input", "no_sub_sample"])
def test_block_flops_with_other_sub_sampling(pairwise, variant):
    kwargs = {"pool_input": True} if variant == "pool_input" else {"sub_sample": False}
    block = randomised(NonLocalBlock(CHANNELS, pairwise=pairwise, **kwargs))
    x = torch.randn(1, CHANNELS, *SMALL)
    assert analyzed(block, x).total() == pytest.approx(
        block_multiply_adds(block, 1, *SMALL), rel=0.01
    )


class _HeadLayers(nn.Module):
    """The keypoint head's layers as a function of the RoI features (what its forward runs
    before decoding the heatmaps into keypoints)."""

    def __init__(self, head: NonLocalKRCNNConvDeconvUpsampleHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.layers(x)


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_keypoint_head_block_flops(pairwise):
    """The paper's head (Sec. 6): 8 convs of 512 channels on 14x14 RoIs, 4 NL blocks; 2 RoIs."""

    def head(positions: list[int]) -> nn.Module:
        return _HeadLayers(
            NonLocalKRCNNConvDeconvUpsampleHead(
                ShapeSpec(channels=256, height=14, width=14),
                num_keypoints=17,
                conv_dims=[512] * 8,
                non_local_positions=positions,
                non_local_args={"pairwise": pairwise},
            )
        )

    rois = torch.randn(2, 256, 14, 14)
    with_blocks, without = randomised(head([2, 4, 6, 8])), randomised(head([]))
    flops = analyzed(with_blocks, rois)
    assert flops.unsupported_ops() == {}
    blocks = {
        f"head.non_local_after_conv_fcn{k}": with_blocks.head.get_submodule(
            f"non_local_after_conv_fcn{k}"
        )
        for k in (2, 4, 6, 8)
    }
    expected = {name: block_multiply_adds(b, 2, 14, 14) for name, b in blocks.items()}
    by_module = flops.by_module()
    for name, count in expected.items():
        assert by_module[f"model.{name}"] == pytest.approx(count, rel=0.01), name
    # The rest of the head is the vanilla head's.
    added = flops.total() - analyzed(without, rois).total()
    assert added == pytest.approx(sum(expected.values()), rel=0.01)


class _ImageModel(nn.Module):
    """A block as a model that takes Detectron2's inputs (``[{"image": (C, H, W)}]``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, batched_inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return self.block(batched_inputs[0]["image"][None])


def test_block_activations():
    """Detectron2's activation count (outputs of products and convs, in millions) of the
    embedded-Gaussian block: theta, phi and g (one product), the fused attention and W_z."""
    block = randomised(NonLocalBlock(CHANNELS))
    image = torch.randn(CHANNELS, *SMALL)
    counts = activation_count_operators(_ImageModel(block), [{"image": image}])
    hw, ci = SMALL[0] * SMALL[1], CHANNELS // 2
    expected = {
        "baddbmm": hw * (ci + 2 * ci + CHANNELS),
        "scaled_dot_product_attention": hw * ci,
    }
    assert {k: round(v * 1e6) for k, v in counts.items()} == expected


class _Products(nn.Module):
    def forward(self, w, batched, v, q, k, val):
        # (C, K) @ (N, K, P): the batch only on the right; (N, K, P) @ (P): a 1-D right operand;
        # (P) @ (P): two vectors; attention with 3 heads
        return (
            w @ batched,
            batched @ v,
            v @ v,
            torch.baddbmm(torch.zeros(1), batched.transpose(1, 2), batched),
            F.scaled_dot_product_attention(q, k, val),
        )


def test_operator_handles():
    n, c, k, p = 4, 3, 5, 6
    q, key, val = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 10)
    flops = FlopCountAnalysis(
        _Products(), (torch.randn(c, k), torch.randn(n, k, p), torch.randn(p), q, key, val)
    )
    assert flops.by_operator() == {
        "matmul": n * c * k * p + n * k * p + p,
        "baddbmm": n * p * k * p,
        "scaled_dot_product_attention": 2 * 3 * 7 * 9 * (8 + 10),
    }
    assert flops.unsupported_ops() == {}


def test_handles_are_registered_where_fvcore_looks():
    table = importlib.import_module("fvcore.nn.flop_count")._DEFAULT_SUPPORTED_OPS
    assert all(table[name] is handle for name, handle in FLOP_HANDLES.items())
