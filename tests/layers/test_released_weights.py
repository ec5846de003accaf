"""NonLocalBlock computes pytorchvideo's NonLocal (the port of FAIR's released code) from its
weights: x pooled before phi and g, floor mode, the output conv's bias folded into the norm."""

import pytest
import torch
from pytorchvideo.layers.nonlocal_net import create_nonlocal

from nl_detectron.layers import NonLocalBlock, from_pytorchvideo

# Odd sizes: floor-mode pooling drops the last row and column, ceil mode would keep them.
X_SHAPE = (2, 16, 3, 7, 9)


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=gen)
    return module


def _assert_equal_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    # Both float32, summing the same products in other orders: a few units of float32 precision
    # relative to the size of the output.
    error = (got - want).norm() / want.norm()
    assert error < 64 * torch.finfo(torch.float32).eps, error


@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
@pytest.mark.parametrize("pool_size", [(1, 2, 2), (1, 1, 1)])
@pytest.mark.parametrize("norm", [torch.nn.BatchNorm3d, None])
def test_same_output_as_pytorchvideo(instantiation, pool_size, norm):
    theirs = create_nonlocal(
        dim_in=16, dim_inner=8, pool_size=pool_size, instantiation=instantiation, norm=norm
    )
    _randomised(theirs, seed=len(instantiation) + pool_size[1])
    ours = from_pytorchvideo(theirs)
    assert isinstance(ours, NonLocalBlock) and ours.pool_input and not ours.ceil_mode
    x = torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(1))
    for training in (False, True):
        theirs.train(training), ours.train(training)
        _assert_equal_to_rounding(ours(x), theirs(x))
    if norm is not None:  # the same running statistics after the training-mode passes
        torch.testing.assert_close(
            ours.out_norm.running_mean, theirs.norm.running_mean - theirs.conv_out.bias
        )
        torch.testing.assert_close(ours.out_norm.running_var, theirs.norm.running_var)


def test_the_paper_layout_is_another_function():
    theirs = _randomised(create_nonlocal(dim_in=16, dim_inner=8, pool_size=(1, 2, 2)), seed=3)
    ours = from_pytorchvideo(theirs).eval()
    theirs.eval()
    paper = NonLocalBlock(16, dim=3, inner_channels=8).eval()  # phi, g pooled; ceil mode
    state = {k: v for k, v in ours.state_dict().items()}
    paper.load_state_dict(state)
    x = torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(2))
    difference = (paper(x) - theirs(x)).norm() / theirs(x).norm()
    assert difference > 1e-2, difference  # far beyond rounding


def test_unsupported_pooling_is_refused():
    theirs = create_nonlocal(dim_in=16, dim_inner=8, pool_size=(2, 2, 2))
    with pytest.raises(ValueError, match=r"pooling .* not supported.*1x2x2"):
        from_pytorchvideo(theirs)
