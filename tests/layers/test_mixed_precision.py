"""The block under autocast on the CPU (bfloat16): the cases CUDA's autocast meets too, where
the CPU can show them (tests/cuda/ runs them on a GPU)."""

import pytest
import torch
from test_non_local_block import PAIRWISE, randomise

from nl_detectron.layers import NonLocalBlock
from nl_detectron.layers.tensor_ops import linear


def _saved_tensors(out: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the autograd node of ``out`` keeps for the backward pass."""
    node = out.grad_fn
    return [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]


def test_autocast_casts_the_shared_weight_not_one_copy_per_sample():
    # A (C_out, C_in) weight applied to N samples: autocast must not save N copies of it.
    weight = torch.randn(16, 8, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    flat = torch.randn(64, 8, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(weight, bias, flat)
    assert out.dtype == torch.bfloat16
    saved_bytes = [
        t.untyped_storage().nbytes() for t in _saved_tensors(out) if isinstance(t, torch.Tensor)
    ]
    # The bf16 weight (256 bytes) and the bf16 input, not 64 materialised weights (16 KiB)
    assert sorted(saved_bytes) == [16 * 8 * 2, 64 * 8 * 10 * 2]
    torch.testing.assert_close(
        out.float(),
        torch.baddbmm(bias[:, None], weight.expand(64, -1, -1), flat),
        rtol=0.02,
        atol=0.1,
    )


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_block_under_bfloat16_autocast(pairwise):
    # Temperature 1 for the disentangled form: at 0.05 its random-weight logits are 20x larger,
    # and a near-one-hot softmax moves whole rows with bf16's rounding of q and k.
    block = randomise(NonLocalBlock(32, pairwise=pairwise, temperature=1.0))
    x = torch.randn(2, 32, 6, 7)
    expected = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    # bf16 keeps 8 bits of mantissa: agreement to about 1 % in norm (a single element can move
    # more where a max-pool window or a peaked softmax row flips with the rounding)
    error = (out.float() - expected).norm() / expected.norm()
    assert error < 0.02, error
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("pairwise", ["dot_product", "concatenation"])
def test_float32_forms_keep_float32_under_autocast(pairwise):
    # Their sums (phi^T g over all keys; the sorted prefix sums) are computed in float32:
    # autocast must not cast their products back to half precision.
    block = randomise(NonLocalBlock(8, pairwise=pairwise))
    x = torch.randn(1, 8, 4, 4) * 3
    expected = block(x)
    seen = []

    def record(module, inputs, output):
        seen.append(output.dtype)

    handle = block.pairwise_fn.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.float16):
        out = block(x)
    handle.remove()
    assert seen == [torch.float32]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.float(), expected, rtol=0.01, atol=0.01 * expected.abs().max().item()
    )


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_attention_rows_do_not_overflow_half_precision(pairwise):
    # affinity() (attention maps) computes its rows in float32, also under autocast, with the
    # logits scaled before the product.
    block = randomise(NonLocalBlock(8, pairwise=pairwise))
    x = torch.randn(1, 8, 4, 4) * 300
    index = torch.tensor([0, 5])
    expected, _ = block.affinity(x, index)
    with torch.autocast("cpu", dtype=torch.float16):
        rows, _ = block.affinity(x.half(), index)
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    torch.testing.assert_close(rows, expected, rtol=0.01, atol=0.01 * expected.abs().max().item())
