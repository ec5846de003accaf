"""The non-local block on CUDA: against the float64 CPU reference in float32 and under float16 /
bfloat16 autocast, training and evaluation, forward and backward; empty batches; the pooling of
the keys; which fused-attention kernel each shape gets; half-precision overflow."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nl_detectron.layers import PAIRWISE_FUNCTIONS, NaiveNonLocal, NonLocalBlock
from nl_detectron.layers.attention import attention_backends, attention_kernels_run
from nl_detectron.layers.tensor_ops import MaxPoolKeepingIndices

pytestmark = pytest.mark.cuda

PAIRWISE = PAIRWISE_FUNCTIONS
PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Error allowed against the float64 reference (relative L2 norm): 4 rounding units of TF32, 40 of
# the half formats. float32 on GPUs runs the 1x1 convolutions in TF32 (10-bit mantissa) like every
# convolution of the model; float16 has 11 bits, bfloat16 8. The gradients of a softmax cancel,
# so half-precision gradients are that coarse in any network. A wrong kernel, layout or scale
# is off by the whole norm.
TOLERANCE = {"float32": 4 * 2**-10, "float16": 40 * 2**-11, "bfloat16": 40 * 2**-8}


def _shape(on_gpu: bool) -> tuple[int, int, int, int]:
    # A batch of 8: the global-context form's output is one vector per sample, so its training
    # batch norm normalises over the samples alone, which 2 would make ill-conditioned.
    return (8, 64, 20, 28) if on_gpu else (8, 32, 5, 7)


def _block(pairwise: str, channels: int, seed: int = 0) -> NonLocalBlock:
    """A block as training leaves it: random weights (the zero-initialised gate too), biases
    near zero, BN statistics. (Large biases would give W_z y a mean far above its spread, whose
    batch norm in half precision cancels catastrophically in any network.)"""
    torch.manual_seed(seed)
    block = NonLocalBlock(channels, pairwise=pairwise)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if name.endswith("bias") else 0.2))
        block.out_norm.running_mean.normal_()
        block.out_norm.running_var.uniform_(0.5, 2.0)
    return block


def _close(
    got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str, floor: float = 0.0
) -> None:
    """``got`` within ``tolerance`` of ``want`` in relative L2 norm, relative to the larger of
    ``want``'s norm and ``floor`` (for tensors that are structurally near zero, such as phi's
    bias gradient under a softmax). A norm, not the largest element: in half precision a
    near-tie of a max-pool window picks another position, which moves that window's gradient
    whole, as it would in any network."""
    error = (got.double().cpu() - want).norm().item()
    scale = max(want.norm().item(), floor)
    assert error <= tolerance * scale, f"{what}: error {error:.3g} > {tolerance} x {scale:.3g}"


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("training", [True, False])
def test_block_matches_float64_reference(device, on_gpu, pairwise, precision, training):
    block = _block(pairwise, _shape(on_gpu)[1]).train(training)
    reference = NaiveNonLocal(_block(pairwise, _shape(on_gpu)[1]).double().train(training))
    x = torch.randn(_shape(on_gpu), generator=torch.Generator().manual_seed(1))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    x64 = x.double().requires_grad_()
    want = reference(x64)
    want.backward(grad.double())

    block = block.to(device)
    xd = x.to(device).requires_grad_()
    dtype = PRECISIONS[precision]
    with torch.autocast(
        device.split(":")[0], dtype=dtype or torch.float16, enabled=dtype is not None
    ):
        got = block(xd)
    assert got.shape == x.shape and torch.isfinite(got).all()
    got.float().backward(grad.to(device))

    tolerance = TOLERANCE[precision]
    _close(got.detach(), want.detach(), tolerance, "output")
    _close(xd.grad, x64.grad, tolerance, "input gradient")
    pairs = list(zip(block.named_parameters(), reference.block.named_parameters()))
    floor = 0.01 * max(q.grad.norm().item() for _, (_, q) in pairs)
    for (name, p), (_, q) in pairs:
        _close(p.grad, q.grad, 2 * tolerance, f"gradient of {name}", floor=floor)


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_empty_batch(device, on_gpu, pairwise, precision):
    # No RoIs in a head: the block returns an empty batch and every parameter a zero gradient.
    block = _block(pairwise, 32).to(device)
    dtype = PRECISIONS[precision]
    x = torch.zeros(0, 32, 14, 14, device=device, requires_grad=True)
    with torch.autocast(
        device.split(":")[0], dtype=dtype or torch.float16, enabled=dtype is not None
    ):
        out = block(x)
    assert out.shape == x.shape
    out.float().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    block.eval()
    with torch.no_grad():
        assert block(x.detach()).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (1, 3), (9, 1)])
def test_max_pool_keeping_indices_matches_max_pool(device, dtype, size):
    x = torch.randn(3, 8, *size, device=device).to(dtype)
    grad = torch.randn_like(F.max_pool2d(x.float(), 2, 2, ceil_mode=True)).to(dtype)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out_a = MaxPoolKeepingIndices.apply(a, [2, 2], True)
    out_b = F.max_pool2d(b, 2, 2, ceil_mode=True)
    assert torch.equal(out_a, out_b)
    out_a.backward(grad)
    out_b.backward(grad)
    assert torch.equal(a.grad, b.grad)


# (what it is, batch, positions, keys, width): the shapes the blocks see in Mask R-CNN
ATTENTION_SHAPES = [
    ("keypoint head, 512-channel head, 100 RoIs", 100, 196, 49, 256),
    ("res3 of an 800x1333 image, width 256", 2, 16800, 4200, 256),
    ("res4 of an 800x1333 image, width 512", 2, 4200, 1050, 512),
    ("quickstart keypoint head, width 16", 64, 196, 49, 16),
]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("what, batch, positions, keys, width", ATTENTION_SHAPES)
def test_attention_kernel_of_each_shape(
    device, on_gpu, precision, what, batch, positions, keys, width
):
    if not on_gpu:  # CPU: the same code at sizes a CPU computes in milliseconds
        batch, positions, keys, width = min(batch, 2), min(positions, 64), min(keys, 16), width
    dtype = PRECISIONS[precision]
    block = NonLocalBlock(2 * width, inner_channels=width).to(device)
    side = int(positions**0.5)
    x = torch.randn(batch, 2 * width, side, positions // side, device=device, requires_grad=True)

    def step():
        with torch.autocast(
            device.split(":")[0], dtype=dtype or torch.float16, enabled=dtype is not None
        ):
            out = block(x)
        out.float().sum().backward()

    kernels = attention_kernels_run(step)
    allowed = attention_backends(device.split(":")[0], dtype or torch.float32, width)
    print(f"{what} ({precision}, {device}): {sorted(k.name for k in kernels)}")
    assert len(kernels) == 1
    kernel = kernels.pop()
    assert kernel.name != "CUDNN_ATTENTION"
    assert kernel in allowed
    if on_gpu:  # the first fused kernel that takes the shape, never the math fallback
        assert kernel.name != "MATH"


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_half_precision_does_not_overflow(device, pairwise):
    # Inputs whose unscaled logits exceed float16's range (65504): the fused kernels and the
    # attention rows scale first and accumulate in float32.
    block = _block(pairwise, 32).to(device).eval()
    x = torch.randn(1, 32, 6, 6, device=device) * 60
    with torch.no_grad():
        want = block(x)
        with torch.autocast(device.split(":")[0], dtype=torch.float16):
            got = block(x)
            rows, _ = block.affinity(x, torch.tensor([0, 7]))
    if torch.isfinite(want).all():
        assert torch.isfinite(got).all()
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()


def test_single_process_sync_bn_under_autocast(device):
    # SyncBN without a process group is batch norm, in every precision.
    torch.manual_seed(0)
    sync = NonLocalBlock(32, norm="SyncBN").to(device)
    plain = NonLocalBlock(32, norm="BN").to(device)
    plain.load_state_dict(sync.state_dict())
    for block in (sync, plain):
        nn.init.ones_(block.out_norm.weight)
    x = torch.randn(4, 32, 6, 6, device=device)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(device.split(":")[0], dtype=dtype):
            a, b = sync(x), plain(x)
        torch.testing.assert_close(a, b)
    assert list(itertools.islice(sync.parameters(), 1))
