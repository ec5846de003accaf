"""Tests of NonLocalBlock against a direct implementation of the paper's formula (Sec. 3)."""

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase
from torch import nn
from training_runs import REPO

from nl_detectron.layers import PAIRWISE_FUNCTIONS, NaiveNonLocal, NonLocalBlock, SyncBatchNorm

PAIRWISE = PAIRWISE_FUNCTIONS
SOFTMAX_FORMS = ("embedded_gaussian", "gaussian")
# Spatial sizes per dim: odd sizes, and sizes of 1 (smaller than the pool window).
SIZES = {
    1: [(1,), (5,), (8,)],
    2: [(1, 1), (3, 5), (4, 4), (1, 3)],
    3: [(1, 1, 1), (2, 3, 5), (3, 2, 2)],
}


def reference_forward(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1 and 6 of the paper, materialising the (N, HW, M) pairwise map; same weights."""
    return NaiveNonLocal(block)(x)


def randomise(block: NonLocalBlock, seed: int = 0) -> NonLocalBlock:
    """Random weights everywhere, including the zero-initialised ones and BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        if isinstance(block.out_norm, nn.modules.batchnorm._BatchNorm):
            block.out_norm.running_mean.normal_(generator=gen)
            block.out_norm.running_var.uniform_(0.5, 2.0, generator=gen)
    return block


def make_input(dim: int, size: tuple, channels: int = 8, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_identity_at_init(pairwise, dim, norm):
    channels = 32 if norm == "GN" else 8
    block = NonLocalBlock(channels, dim=dim, pairwise=pairwise, norm=norm)
    x = torch.randn(2, channels, *SIZES[dim][1]) * 10
    assert torch.equal(block(x), x)
    block.eval()
    assert torch.equal(block(x), x)


def assert_matches_reference(block: NonLocalBlock, x: torch.Tensor) -> None:
    """block(x) and its gradients (input and every parameter) equal the reference's (float64)."""
    x = x.requires_grad_()
    params = list(block.parameters())
    out = block(x)
    expected = reference_forward(block, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    expected_grads = torch.autograd.grad(expected, [x, *params], grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_matches_reference_forward_and_backward(pairwise, dim, sub_sample):
    block = NonLocalBlock(8, dim=dim, pairwise=pairwise, sub_sample=sub_sample).double()
    randomise(block)
    for i, size in enumerate(SIZES[dim]):
        for training in (True, False):
            block.train(training)
            assert_matches_reference(block, make_input(dim, size, seed=i))


@pytest.mark.parametrize("inner", [8, 16, 24])
@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_dot_product_folded_and_unfolded(inner, norm):
    # With C' >= C/2, on maps of at least 5 (C + C') positions, theta and W_z are folded into
    # one C x C map per sample; otherwise not.
    block = NonLocalBlock(32, pairwise="dot_product", inner_channels=inner, norm=norm).double()
    randomise(block, seed=inner)
    assert block.pairwise_fn.folds_output(20 * 20) == (2 * inner >= 32)
    assert not block.pairwise_fn.folds_output(5 * 7)
    for training, size in itertools.product((True, False), [(20, 20), (5, 7)]):
        block.train(training)
        assert_matches_reference(block, make_input(2, size, channels=32, seed=2))


@pytest.mark.parametrize("pairwise", SOFTMAX_FORMS)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1 << 24, 7])
def test_inference_path_matches_reference(pairwise, dim, chunk):
    # Without autograd on CPU the softmax forms run in blocks of query rows; with a tiny block
    # size every block boundary (and a ragged last block) is exercised.
    block = NonLocalBlock(
        8, dim=dim, pairwise=pairwise, inner_channels=6, inference_chunk_elements=chunk
    )
    block = randomise(block).double().eval()
    for i, size in enumerate(SIZES[dim]):
        x = make_input(dim, size, seed=i)
        with torch.no_grad():
            out = block(x)
        torch.testing.assert_close(out, reference_forward(block, x), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        empty = block(torch.zeros(0, 8, *SIZES[dim][0], dtype=torch.double))
    assert empty.shape == (0, 8, *SIZES[dim][0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_path_half_precision_large_logits(dtype):
    # Logits of about 3e5 (beyond fp16's range): the inference path computes them in float32.
    block = randomise(NonLocalBlock(64, pairwise="gaussian", norm=""), seed=5).eval()
    x = (torch.randn(2, 64, 6, 7) * 200).to(dtype)
    with torch.no_grad():
        out = block.to(dtype)(x)
        expected = block.float()(x.float())
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() / expected.abs().max() < 0.02


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_matches_reference_float32_larger(pairwise):
    block = randomise(NonLocalBlock(16, pairwise=pairwise, norm=""), seed=3)
    x = torch.randn(2, 16, 9, 13)
    torch.testing.assert_close(block(x), reference_forward(block, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_gradcheck(pairwise):
    block = randomise(NonLocalBlock(4, pairwise=pairwise, norm="BN")).double()
    names = [n for n, _ in block.named_parameters()]
    x = make_input(2, (3, 3), channels=4, batch=2).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]

    def fn(x, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_default_and_paper_scale(pairwise):
    block = NonLocalBlock(16, pairwise=pairwise, inner_channels=4)
    if pairwise == "embedded_gaussian":
        assert block.scale == 4**-0.5  # released code: inner ** -0.5
    elif pairwise == "gaussian":
        assert block.scale == 16**-0.5  # raw x_i^T x_j over the 16 input channels
    elif pairwise == "disentangled":  # the released scale, over the temperature of DNL's code
        assert block.scale == pytest.approx(4**-0.5 / 0.05)
    else:
        assert block.scale is None
    if pairwise in (*SOFTMAX_FORMS, "disentangled"):
        paper = randomise(NonLocalBlock(16, pairwise=pairwise, scale=1.0)).double()
        x = make_input(2, (3, 4), channels=16) * 0.3
        assert paper.scale == (1.0 if pairwise in SOFTMAX_FORMS else pytest.approx(1 / 0.05))
        torch.testing.assert_close(paper(x), reference_forward(paper, x))


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", ["BN", "SyncBN", "GN", ""])
def test_empty_batch(pairwise, training, norm):
    block = randomise(NonLocalBlock(32, pairwise=pairwise, norm=norm)).train(training)
    norm_state = {k: v.clone() for k, v in block.out_norm.state_dict().items()} if norm else {}
    x = torch.randn(0, 32, 5, 7, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    # Every parameter stays in the autograd graph (DDP expects gradients for all of them).
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert not p.grad.any(), name
    if norm:  # running statistics are not touched by an empty batch
        for key, value in block.out_norm.state_dict().items():
            assert torch.equal(value, norm_state[key]), key


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("norm", ["BN", ""])
def test_zero_init_parameter_gets_gradient(pairwise, norm):
    block = NonLocalBlock(8, pairwise=pairwise, norm=norm)
    zero_param = block.out_norm.weight if norm else block.out_conv.weight
    assert not zero_param.any()
    x = torch.randn(2, 8, 5, 6)
    loss = (block(x) * torch.randn(2, 8, 5, 6)).sum()
    loss.backward()
    assert zero_param.grad is not None and zero_param.grad.abs().sum() > 0
    optimizer = torch.optim.SGD(block.parameters(), lr=1.0)
    optimizer.step()
    assert not torch.equal(block(x), x)  # one step later the block contributes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pairwise": "softmax"}, r"Unknown pairwise function 'softmax'.*'embedded_gaussian'"),
        ({"dim": 4}, r"dim 1, 2 or 3; got dim=4"),
        ({"norm": "FrozenBN"}, r"norm='FrozenBN'.*no-op.*'BN', 'SyncBN', 'GN' or ''"),
        ({"norm": "LayerNorm"}, r"Unknown norm 'LayerNorm'.*'BN', 'SyncBN', 'GN'"),
        ({"norm": "GN"}, r"divisible by 32; got in_channels=8"),
        ({"inner_channels": 0}, r"positive number of inner channels; got inner_channels=0"),
        ({"scale": -1.0}, r"scale must be positive or None; got scale=-1.0"),
    ],
)
def test_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NonLocalBlock(8, **kwargs)


def test_refuses_too_few_channels_for_default_inner():
    with pytest.raises(ValueError, match=r"inner_channels=0 \(in_channels=1\)"):
        NonLocalBlock(1)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_refuses_wrong_input_rank(dim):
    block = NonLocalBlock(8, dim=dim)
    layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, T, H, W)"}[dim]
    bad = torch.randn(2, 8, *([3] * (dim + 1)))
    expected = (
        f"NonLocalBlock(dim={dim}) takes an input of shape {layout}. "
        f"Got {tuple(bad.shape)} instead!"
    )
    with pytest.raises(ValueError) as info:
        block(bad)
    assert str(info.value) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_large_logits(dtype):
    # Gaussian form: the logits are x_i^T x_j / 8, about 64 * 200^2 / 8 = 3e5, far beyond fp16's
    # range (65504), and computed from the half-precision input itself (no embedding rounding).
    block = randomise(NonLocalBlock(64, pairwise="gaussian", norm=""), seed=5)
    x = (torch.randn(2, 64, 6, 7) * 200).to(dtype)
    out = block.to(dtype)(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # The same rounded weights and input in float32: only the arithmetic precision differs.
    expected = block.float()(x.float())
    rel = (out.float() - expected).abs().max() / expected.abs().max()
    assert rel < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_embedded_gaussian(dtype):
    block = randomise(NonLocalBlock(64, norm=""), seed=5)
    # Large inputs: finite output. (Rounding theta and phi to half precision moves logits of
    # this size by more than their gaps, so the result is not comparable with float32.)
    large = (torch.randn(2, 64, 6, 7) * 200).to(dtype)
    assert torch.isfinite(block.to(dtype)(large)).all()
    # Moderate inputs: close to float32 with the same rounded weights.
    x = (torch.randn(2, 64, 6, 7) * 0.2).to(dtype)
    out = block(x)
    expected = block.float()(x.float())
    assert (out.float() - expected).abs().max() / expected.abs().max() < 0.03


@pytest.mark.parametrize("pairwise", ["dot_product", "concatenation"])
def test_half_precision_linear_forms(pairwise):
    block = randomise(NonLocalBlock(16, pairwise=pairwise, norm=""), seed=6)
    x = (torch.randn(2, 16, 20, 20) * 30).to(torch.bfloat16)
    out = block.to(torch.bfloat16)(x)
    expected = block.float()(x.float())
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() / expected.abs().max() < 0.02


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_concatenation_ties_and_relu_boundary(pairwise):
    # Repeated key values (ties in the sort) and queries sitting exactly on the ReLU kink.
    block = randomise(NonLocalBlock(8, pairwise=pairwise, sub_sample=False)).double()
    x = make_input(2, (2, 3))
    x = torch.cat([x, x], dim=3)  # every key appears twice
    torch.testing.assert_close(block(x), reference_forward(block, x))


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_torchscript(pairwise, norm):
    block = randomise(NonLocalBlock(32, pairwise=pairwise, norm=norm))
    scripted = torch.jit.script(block)
    x = torch.randn(2, 32, 5, 3)
    for training in (True, False):
        block.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x), block(x))
    with pytest.raises(Exception, match=r"takes an input of shape \(N, C, H, W\)"):
        scripted(torch.randn(8, 5, 3))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sync_bn_without_distributed(dim):
    sync = randomise(NonLocalBlock(8, dim=dim, norm="SyncBN"))
    plain = NonLocalBlock(8, dim=dim, norm="BN")
    plain.load_state_dict(sync.state_dict())
    assert isinstance(sync.out_norm, SyncBatchNorm)
    x = torch.randn(2, 8, *SIZES[dim][1])
    torch.testing.assert_close(sync(x), plain(x))  # training mode, batch statistics
    torch.testing.assert_close(sync.out_norm.running_mean, plain.out_norm.running_mean)
    assert torch.equal(NonLocalBlock(8, dim=dim, norm="SyncBN")(x), x)


def test_norm_modules():
    assert isinstance(NonLocalBlock(8, dim=1).out_norm, nn.BatchNorm1d)
    assert isinstance(NonLocalBlock(8, dim=2).out_norm, nn.BatchNorm2d)
    assert isinstance(NonLocalBlock(8, dim=3).out_norm, nn.BatchNorm3d)
    gn = NonLocalBlock(64, norm="GN").out_norm
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    for norm in ("", None):
        block = NonLocalBlock(8, norm=norm)
        assert block.out_norm is None
        assert not block.out_conv.weight.any() and not block.out_conv.bias.any()
    with_norm = NonLocalBlock(8)
    assert with_norm.out_conv.bias is None  # the norm's beta makes a bias redundant
    assert with_norm.out_conv.weight.std() > 0
    assert not with_norm.out_norm.weight.any() and not with_norm.out_norm.bias.any()


def test_init_std():
    block = NonLocalBlock(256, inner_channels=128, init_std=0.01)
    for layer in (block.theta, block.phi, block.g, block.out_conv):
        assert abs(layer.weight.std().item() - 0.01) < 0.001
    assert not block.theta.bias.any() and not block.g.bias.any()


@pytest.mark.parametrize(
    "pairwise, keys",
    [
        ("embedded_gaussian", ["theta", "phi", "g"]),
        ("gaussian", ["g"]),
        ("dot_product", ["theta", "phi", "g"]),
        ("concatenation", ["theta", "phi", "g"]),
    ],
)
def test_state_dict_keys(pairwise, keys):
    block = NonLocalBlock(8, pairwise=pairwise)
    expected = [f"{k}.{p}" for k in keys for p in ("weight", "bias")]
    if pairwise == "concatenation":
        expected.append("concat_project.weight")
    expected += [
        "out_norm.weight",
        "out_norm.bias",
        "out_norm.running_mean",
        "out_norm.running_var",
        "out_norm.num_batches_tracked",
        "out_conv.weight",
    ]
    assert sorted(block.state_dict()) == sorted(expected)
    assert block.concat_project is None or block.concat_project.weight.shape == (1, 8, 1, 1)
    no_norm = NonLocalBlock(8, pairwise=pairwise, norm="")
    assert "out_conv.bias" in no_norm.state_dict()
    assert not any(k.startswith("out_norm") for k in no_norm.state_dict())


def test_block_base_interface():
    block = NonLocalBlock(16)
    assert isinstance(block, CNNBlockBase)
    assert (block.in_channels, block.out_channels, block.stride) == (16, 16, 1)
    try:
        from detectron2.layers import CNNBlockBase as Detectron2Base
    except ImportError:
        pass
    else:  # detectron2's ResNet stages assert isinstance(block, CNNBlockBase)
        assert isinstance(block, Detectron2Base)
    block.freeze()
    assert not any(p.requires_grad for p in block.parameters())


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("sub_sample", [True, False])
def test_affinity_rows(pairwise, sub_sample):
    block = randomise(NonLocalBlock(8, pairwise=pairwise, sub_sample=sub_sample)).double()
    x = make_input(2, (5, 6))
    query_index = torch.tensor([0, 7, 29])
    rows, key_shape = block.affinity(x, query_index)
    assert key_shape == ([3, 3] if sub_sample else [5, 6])
    assert rows.shape == (2, 3, key_shape[0] * key_shape[1])
    # Rows of the reference map f / C(x).
    theta = x if block.theta is None else block.theta(x)
    phi = x if block.phi is None else block.phi(x)
    if sub_sample:
        phi = F.max_pool2d(phi, 2, 2, ceil_mode=True)
    if block.conv_mask is not None:  # the unary logits w_m^T x_j at the keys
        unary = block.conv_mask(x)
        unary = F.max_pool2d(unary, 2, 2, ceil_mode=True) if sub_sample else unary
        unary = torch.softmax(unary.flatten(1), dim=1)[:, None, :].expand(-1, 3, -1)
    if pairwise == "disentangled":  # whitened over all positions, then the chosen queries
        theta = theta.flatten(2) - theta.flatten(2).mean(2, keepdim=True)
        phi = phi.flatten(2) - phi.flatten(2).mean(2, keepdim=True)
        theta = theta.view(2, -1, 5, 6)
    theta, phi = theta.flatten(2)[:, :, query_index], phi.flatten(2)
    m = phi.shape[2]
    if pairwise == "global_context":
        expected = unary
    elif pairwise == "disentangled":  # the mean of the two terms
        pairwise_term = torch.softmax(block.scale * theta.transpose(1, 2) @ phi, dim=2)
        expected = (pairwise_term + unary) / 2
        torch.testing.assert_close(rows.sum(2), torch.ones(2, 3, dtype=rows.dtype))
    elif pairwise in SOFTMAX_FORMS:
        expected = torch.softmax(block.scale * theta.transpose(1, 2) @ phi, dim=2)
        torch.testing.assert_close(rows.sum(2), torch.ones(2, 3, dtype=rows.dtype))
    elif pairwise == "dot_product":
        expected = theta.transpose(1, 2) @ phi / m
    else:
        w1, w2 = block.concat_project.weight.flatten().split(4)
        a = torch.einsum("c,bcn->bn", w1, theta)
        b = torch.einsum("c,bcm->bm", w2, phi)
        expected = F.relu(a[:, :, None] + b[:, None, :]) / m
    torch.testing.assert_close(rows, expected)


def test_inputs_smaller_than_pool_window():
    for dim, pairwise in itertools.product([1, 2, 3], PAIRWISE):
        block = randomise(NonLocalBlock(8, dim=dim, pairwise=pairwise)).eval()
        x = torch.randn(1, 8, *([1] * dim))
        out = block(x)
        assert out.shape == x.shape and torch.isfinite(out).all()


def _load_benchmark():
    path = REPO / "benchmarks" / "benchmark_non_local_block.py"
    spec = importlib.util.spec_from_file_location("benchmark_non_local_block", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_benchmark_naive_block_computes_the_same(pairwise):
    # The benchmark's timings and memory figures mean something only if both blocks agree.
    bench = _load_benchmark()
    block = randomise(NonLocalBlock(8, pairwise=pairwise)).double()
    x = make_input(2, (5, 7))
    for concat in ("pairs", "split"):
        naive = bench.NaiveNonLocal(block, concat=concat)
        torch.testing.assert_close(naive(x), block(x))
    n, m = bench.SIZES["res3"].positions()
    assert (n, m) == (16800, 4200)
    assert bench.needed_bytes("naive", "concatenation", bench.SIZES["res3"]) > 8 * 2**30


def test_disentangled_attention_terms():
    block = randomise(NonLocalBlock(8, pairwise="disentangled")).double()
    x = make_input(2, (5, 6))
    index = torch.tensor([0, 7, 29])
    rows, _ = block.affinity(x, index)
    pairwise, _ = block.affinity(x, index, "pairwise")
    unary, _ = block.affinity(x, index, "unary")
    torch.testing.assert_close(rows, (pairwise + unary) / 2)
    ones = torch.ones(2, 3, dtype=rows.dtype)
    torch.testing.assert_close(pairwise.sum(2), ones)
    torch.testing.assert_close(unary.sum(2), ones)
    assert torch.equal(unary[:, 0], unary[:, 2])  # the same for every query
    with pytest.raises(ValueError, match="valid ones are"):
        randomise(NonLocalBlock(8)).affinity(x.float(), index, "pairwise")
