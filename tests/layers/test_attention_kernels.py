"""Which fused-attention kernel the softmax forms run, and the batches no kernel takes."""

import pytest
import torch
from test_non_local_block import PAIRWISE, SIZES, randomise
from torch.nn.attention import SDPBackend

from nl_detectron.layers import NonLocalBlock
from nl_detectron.layers.attention import (
    FLASH_MAX_WIDTH,
    attention_backends,
    attention_kernels_run,
)

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [16, 64, 256, 512, 1024])
def test_backend_policy(device, dtype, width):
    backends = attention_backends(device, dtype, width)
    # cuDNN builds a plan for every new shape; the RoI heads change shape every iteration.
    assert SDPBackend.CUDNN_ATTENTION not in backends
    assert backends[-1] == SDPBackend.MATH  # a shape no fused kernel takes still runs
    if device == "cpu":
        assert backends == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    elif dtype in HALF and width <= FLASH_MAX_WIDTH:
        assert backends[:2] == [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    else:  # FlashAttention takes neither float32 nor heads wider than 256 (res4: 512)
        assert backends[0] == SDPBackend.EFFICIENT_ATTENTION
        assert SDPBackend.FLASH_ATTENTION not in backends


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "gaussian"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_softmax_forms_use_fused_attention(pairwise, dim):
    # Training on the CPU runs the fused kernel, never the math fallback (which would hold the
    # N x M map).
    block = randomise(NonLocalBlock(8, dim=dim, pairwise=pairwise, inner_channels=6))
    x = torch.randn(2, 8, *SIZES[dim][1], requires_grad=True)
    kernels = attention_kernels_run(lambda: block(x).sum().backward())
    assert kernels == {SDPBackend.FLASH_ATTENTION}
    assert x.grad is not None


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_empty_batch_keeps_every_parameter_in_the_graph(pairwise, norm):
    # A head with no RoIs in one process: DDP needs a (zero) gradient for every parameter.
    block = randomise(NonLocalBlock(32, pairwise=pairwise, norm=norm))
    x = torch.zeros(0, 32, 7, 7, requires_grad=True)
    kernels = attention_kernels_run(lambda: block(x).sum().backward())
    assert kernels == set()  # no fused kernel gets a batch of 0
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert not p.grad.any(), name
