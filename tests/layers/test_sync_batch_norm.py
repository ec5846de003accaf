"""SyncBatchNorm: batch norm over the processes' batches, also on CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nl_detectron.engine.launch import launch
from nl_detectron.layers import SyncBatchNorm

# Per-process batch sizes of the SyncBN check: unequal, and one process without any element.
SYNC_BN_CASES = {"uneven": (3, 1), "one empty": (0, 4)}


SYNC_BN_SHAPES = {1: (5,), 2: (4, 3), 3: (2, 3, 2)}  # spatial sizes for dim 1, 2, 3


def _sync_bn_case(dim: int, sizes: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The batch of all processes (concatenated), the output gradient and the affine parameters,
    in float64."""
    g = torch.Generator().manual_seed(dim * 10 + sizes[0])
    x = torch.randn(sum(sizes), 6, *SYNC_BN_SHAPES[dim], generator=g, dtype=torch.float64) * 3 + 1
    return {
        "x": x,
        "grad": torch.randn(x.shape, generator=g, dtype=torch.float64),
        "weight": torch.rand(6, generator=g, dtype=torch.float64) + 0.5,
        "bias": torch.randn(6, generator=g, dtype=torch.float64),
    }


def _with_affine(norm: nn.Module, case: dict[str, torch.Tensor]) -> nn.Module:
    norm = norm.double()
    with torch.no_grad():
        norm.weight.copy_(case["weight"])
        norm.bias.copy_(case["bias"])
    return norm


def _sync_bn_worker(out_dir: str) -> None:
    rank = torch.distributed.get_rank()
    results = {}
    for name, sizes in SYNC_BN_CASES.items():
        for dim in SYNC_BN_SHAPES:
            case = _sync_bn_case(dim, sizes)
            mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            x = case["x"][mine].clone().requires_grad_(True)
            norm = _with_affine(SyncBatchNorm(6), case)
            for _ in range(2):  # two steps of running statistics
                out = norm(x)
            out.backward(case["grad"][mine])
            results[name, dim] = {
                "out": out.detach(),
                "input_grad": x.grad,
                "weight_grad": norm.weight.grad,
                "bias_grad": norm.bias.grad,
                "running_mean": norm.running_mean,
                "running_var": norm.running_var,
                "num_batches_tracked": norm.num_batches_tracked,
            }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_sync_batch_norm_across_cpu_processes_equals_batch_norm_of_the_whole_batch(tmp_path):
    launch(_sync_bn_worker, 2, dist_url="auto", backend="gloo", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, sizes in SYNC_BN_CASES.items():
        for dim in SYNC_BN_SHAPES:
            case = _sync_bn_case(dim, sizes)
            x = case["x"].clone().requires_grad_(True)
            bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
            reference = _with_affine(bn(6), case)
            for _ in range(2):
                out = reference(x)
            out.backward(case["grad"])
            got = [r[name, dim] for r in ranks]
            where = f"{name}, dim {dim}"
            torch.testing.assert_close(torch.cat([g["out"] for g in got]), out, msg=where)
            torch.testing.assert_close(torch.cat([g["input_grad"] for g in got]), x.grad)
            # Each process holds its share of the parameter gradients; DDP sums (averages) them.
            torch.testing.assert_close(
                got[0]["weight_grad"] + got[1]["weight_grad"], reference.weight.grad
            )
            torch.testing.assert_close(
                got[0]["bias_grad"] + got[1]["bias_grad"], reference.bias.grad
            )
            for g in got:  # the same running statistics in every process
                torch.testing.assert_close(g["running_mean"], reference.running_mean)
                torch.testing.assert_close(g["running_var"], reference.running_var)
                assert int(g["num_batches_tracked"]) == 2


def test_sync_batch_norm_is_batch_norm_in_one_process():
    x = torch.randn(4, 6, 3, 3)
    sync, plain = SyncBatchNorm(6), nn.BatchNorm2d(6)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x))


def test_empty_half_precision_batch_joins_with_float32_statistics(monkeypatch):
    # On accelerators torch's SyncBatchNorm all-gathers (mean, invstd, count) from every process:
    # float32 from a process with elements, zeros in the input's dtype from an empty one. Under
    # autocast the two would differ (float16 against float32) inside one NCCL collective. A
    # meta-device tensor takes the accelerator path here without a GPU.
    seen = []

    def torch_sync_forward(module, input):
        seen.append(input.dtype)
        return input

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", torch_sync_forward)
    norm = SyncBatchNorm(8)
    monkeypatch.setattr(norm, "_world_size", lambda: 2)
    for dtype in (torch.float16, torch.bfloat16):
        out = norm(torch.empty(0, 8, 4, 4, dtype=dtype, device="meta"))
        assert out.dtype == dtype and out.shape == (0, 8, 4, 4)
    non_empty = norm(torch.empty(3, 8, 4, 4, dtype=torch.float16, device="meta"))
    assert non_empty.dtype == torch.float16
    # empty: upcast; with elements: torch computes its statistics in float32 itself
    assert seen == [torch.float32, torch.float32, torch.float16]
