"""Time and peak memory of NonLocalBlock against a naive block that materialises the N x M map.

The naive block computes the paper's formula (Sec. 3.2) the way the common implementations do:
1x1 convolutions, the full pairwise map f (N, HW, M), then ``f @ g``
(``nl_detectron.layers.NaiveNonLocal``). It shares the weights of the NonLocalBlock it is
compared with and gets the same inputs.

    python benchmarks/benchmark_non_local_block.py                  # res4 and res3, 5 repeats
    python benchmarks/benchmark_non_local_block.py --quick          # small smoke run
    python benchmarks/benchmark_non_local_block.py --device cuda
    python benchmarks/benchmark_non_local_block.py --clock cpu      # on a shared CPU

Time (wall clock, or CPU time of this process with ``--clock cpu``): median and minimum over
``--repeats`` runs after one warm-up, the blocks alternating (the minimum is the less disturbed
figure where other processes share the machine). Peak memory: on CPU each measurement runs in a
fresh child process (with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns freed tensor
memory at once) and reports the growth of its peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident size just before the run, i.e. everything
the forward and backward pass allocate beyond the block's weights, the input and the output
gradient; on CUDA, ``torch.cuda.max_memory_allocated`` over the allocated memory before the run.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    alternate,
    device_name,
    fmt_mb,
    fmt_ratio,
    load_average,
    measure_peak,
    medians,
    run_memory_child,
)

from nl_detectron.layers import NaiveNonLocal, NonLocalBlock  # noqa: E402

PAIRWISE = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


@dataclass(frozen=True)
class Size:
    """A 2D feature map of an 800x1344 COCO image (batch 2) at one ResNet stage."""

    batch: int
    channels: int
    height: int
    width: int

    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    def positions(self) -> tuple[int, int]:
        """Query positions HW and key positions M after the 2x2 pooling (ceil mode)."""
        keys = -(-self.height // 2) * -(-self.width // 2)
        return self.height * self.width, keys


SIZES = {
    "res4": Size(2, 1024, 50, 84),  # stride 16
    "res3": Size(2, 512, 100, 168),  # stride 8
    "quick": Size(2, 64, 12, 20),
}


def needed_bytes(impl: str, pairwise: str, size: Size, itemsize: int = 4) -> int:
    """Rough peak of a naive block's pairwise maps in a forward and backward pass (0 for ours)."""
    if impl == "ours":
        return 0
    n, m = size.positions()
    maps = size.batch * n * m * itemsize
    if pairwise == "concatenation" and impl == "naive":
        # the concatenated pairs (2C' = C channels) and their gradient
        return 2 * maps * size.channels
    return 4 * maps  # the map, its normalised form and their gradients


def make_block(pairwise: str, size: Size, device: str) -> NonLocalBlock:
    torch.manual_seed(0)
    block = NonLocalBlock(size.channels, pairwise=pairwise).to(device)
    with torch.no_grad():  # a trained-looking block: gamma 1 instead of the zero init
        block.out_norm.weight.fill_(1.0)
    return block


def make_module(impl: str, block: NonLocalBlock) -> nn.Module:
    if impl == "ours":
        return block
    return NaiveNonLocal(block, concat="split" if impl == "naive-split" else "pairs")


def forward_backward(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(grad)


# ---------------------------------------------------------------------------------------------
# Peak memory


def pass_peak_bytes(module: nn.Module, size: Size, device: str = "cpu") -> int:
    """Bytes a forward and backward pass of ``module`` at ``size`` adds to the peak memory, beyond
    the weights, the input and the output gradient (:func:`common.measure_peak`).

    On CPU a warm-up pass at a small size first, so that lazily loaded libraries are not counted.
    """
    if device == "cpu":
        small = torch.randn(size.batch, size.channels, 6, 10, requires_grad=True)
        forward_backward(module, small, torch.randn_like(small))
        module.zero_grad(set_to_none=True)
    x = torch.randn(size.shape(), device=device, requires_grad=True)
    grad = torch.randn(size.shape(), device=device)
    return measure_peak(lambda: forward_backward(module, x, grad), device)["growth_bytes"]


def memory_child(cases: list[tuple[str, str, list[int]]]) -> None:
    """Child process: for each ``(pairwise, impl, shape)`` in turn, print the peak memory of a
    forward and backward pass as JSON (``case``, ``peak_bytes``)."""
    for pairwise, impl, shape in cases:
        size = Size(*shape)
        module = make_module(impl, make_block(pairwise, size, "cpu"))
        peak_bytes = pass_peak_bytes(module, size)
        print(json.dumps({"case": [pairwise, impl, shape], "peak_bytes": peak_bytes}))
        del module


def peak_memory(impl: str, pairwise: str, size_name: str, device: str) -> int:
    """Bytes allocated at the peak of a forward and backward pass, beyond weights and inputs."""
    if device == "cuda":
        size = SIZES[size_name]
        module = make_module(impl, make_block(pairwise, size, device))
        return pass_peak_bytes(module, size, device)
    return run_memory_child(__file__, impl, pairwise, size_name)[-1]["peak_bytes"]


# ---------------------------------------------------------------------------------------------
# Attention core throughput


def matmul_gflops(device: str, repeats: int, clock: str, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with torch.no_grad():
        seconds = statistics.median(alternate({"mm": lambda: a @ b}, repeats, device)[clock]["mm"])
    return 2 * n**3 / seconds / 1e9


def core_gflops(
    pairwise: str, size: Size, device: str, repeats: int, clock: str
) -> dict[str, Optional[float]]:
    """GFLOP/s of the pairwise computation alone (y from theta, phi, g), forward, no grad.

    Counts the arithmetic the result needs (for ours, without the zero padding of the Gaussian
    form's values).
    """
    block = make_block(pairwise, size, device).eval()
    naive = NaiveNonLocal(block, concat="split")
    x = torch.randn(size.shape(), device=device)
    f, w_f = block.pairwise_fn, block._w_f()
    with torch.no_grad():
        # (N, C, H, W) -> (N, C, HW)
        flat = x.flatten(2)
        keys, values, _ = block._keys_values(x, flat)  # (N, Ck, M), (N, C', M)
        # (N, Cq, HW): theta(x), or x itself for the Gaussian form
        theta = flat if block.theta is None else block.theta(x).flatten(2)
        # what f compares the keys with: theta, x, or a_i = w_1^T theta_i for concatenation
        queries = f.embed_queries(flat, block._theta_weight(), block._theta_bias(), w_f)
        # (N, C', M) -> (N, M, C'), contiguous as in the naive block
        g = values.transpose(1, 2).contiguous()
        phi = keys.contiguous()
        m = keys.shape[2]
        times = alternate(
            {
                "ours": lambda: f(queries, keys, values, w_f),
                "naive": lambda: naive.pairwise_map(theta, phi) @ g,
            },
            repeats,
            device,
        )[clock]
    seconds = medians(times)
    batch, n, cq, cv = size.batch, flat.shape[2], keys.shape[1], values.shape[1]
    naive_flops = 2 * batch * n * m * (cq + cv)
    if pairwise in ("embedded_gaussian", "gaussian"):
        ours_flops: Optional[int] = naive_flops
    elif pairwise == "dot_product":
        ours_flops = 2 * batch * (m + n) * cq * cv
    else:
        ours_flops = None  # sort, cumsum and gathers: not matrix arithmetic
    if pairwise == "concatenation":
        naive_flops = 2 * batch * n * m * cv  # the split map: f @ g only
    return {
        "ours_s": seconds["ours"],
        "naive_s": seconds["naive"],
        "ours_gflops": None if ours_flops is None else ours_flops / seconds["ours"] / 1e9,
        "naive_gflops": naive_flops / seconds["naive"] / 1e9,
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="res4,res3", help="comma-separated: res4, res3, quick")
    parser.add_argument("--pairwise", default=",".join(PAIRWISE), help="comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: CPU time of this process (CPU only, for a shared machine)",
    )
    parser.add_argument("--max-naive-gb", type=float, default=8.0, help="skip larger naive runs")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        impl, pairwise, size_name = args.memory_child
        memory_child([(pairwise, impl, list(SIZES[size_name].shape()))])
        return
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time: use it with --device cpu")
    clock = args.clock
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    repeats = 2 if args.quick else args.repeats
    pairwise_list = args.pairwise.split(",")
    device = args.device
    print(
        f"# NonLocalBlock benchmark, {datetime.date.today()}: torch {torch.__version__}, "
        f"device {device} ({device_name(device)}), "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.clock} clock, "
        f"{repeats} repeats, "
        f"load average {load_average()}"
    )

    rows = []
    for size_name in sizes:
        size = SIZES[size_name]
        for pairwise in pairwise_list:
            impls = ["ours", "naive"] + (["naive-split"] if pairwise == "concatenation" else [])
            block = make_block(pairwise, size, device)
            x = torch.randn(size.shape(), device=device, requires_grad=True)
            grad = torch.randn(size.shape(), device=device)
            runnable, skipped = [], {}
            for impl in impls:
                need = needed_bytes(impl, pairwise, size)
                if need > args.max_naive_gb * 2**30:
                    skipped[impl] = f"skipped (needs {need / 2**30:.0f} GB)"
                else:
                    runnable.append(impl)
            modules = {impl: make_module(impl, block) for impl in runnable}
            times = alternate(
                {
                    impl: (lambda m=module, x=x, grad=grad: forward_backward(m, x, grad))
                    for impl, module in modules.items()
                },
                repeats,
                device,
            )[clock]
            memory = {impl: peak_memory(impl, pairwise, size_name, device) for impl in runnable}
            for impl in impls:
                row = {"size": size_name, "pairwise": pairwise, "impl": impl}
                row.update(
                    seconds=statistics.median(times[impl]) if impl in times else None,
                    fastest=min(times[impl]) if impl in times else None,
                    peak_bytes=memory.get(impl),
                    note=skipped.get(impl),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
            del block, x, grad, modules

    print("\n## Forward + backward (training)\n")
    print(
        "| size | pairwise | block | median (s) | vs naive | fastest (s) | vs naive "
        "| peak memory (MB) | vs naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        naive = next(
            r
            for r in rows
            if (r["size"], r["pairwise"], r["impl"]) == (row["size"], row["pairwise"], "naive")
        )
        if row["note"]:
            print(f"| {row['size']} | {row['pairwise']} | {row['impl']} | {row['note']} |||||||")
            continue
        print(
            f"| {row['size']} | {row['pairwise']} | {row['impl']} | {row['seconds']:.3f} | "
            f"{fmt_ratio(row['seconds'], naive['seconds'])} | {row['fastest']:.3f} | "
            f"{fmt_ratio(row['fastest'], naive['fastest'])} | {fmt_mb(row['peak_bytes'])} | "
            f"{fmt_ratio(row['peak_bytes'], naive['peak_bytes'])} |"
        )

    inference_size = "quick" if args.quick else "res4"
    size = SIZES[inference_size]
    print(f"\n## Forward only (inference: eval mode, no_grad), {inference_size}\n")
    print("| pairwise | block | median (s) | vs naive | fastest (s) | vs naive |")
    print("|---|---|---|---|---|---|")
    for pairwise in pairwise_list:
        block = make_block(pairwise, size, device).eval()
        # the pairs of the literal concatenation form do not fit at res4 (36 GB)
        impls = ["ours", "naive-split" if pairwise == "concatenation" else "naive"]
        x = torch.randn(size.shape(), device=device)
        with torch.no_grad():
            modules = {impl: make_module(impl, block) for impl in impls}
            times = alternate(
                {impl: (lambda m=module, x=x: m(x)) for impl, module in modules.items()},
                repeats,
                device,
            )[clock]
        median = medians(times)
        fastest = {i: min(times[i]) for i in impls}
        for impl in impls:
            print(
                f"| {pairwise} | {impl} | {median[impl]:.3f} | "
                f"{fmt_ratio(median[impl], median[impls[-1]])} | {fastest[impl]:.3f} | "
                f"{fmt_ratio(fastest[impl], fastest[impls[-1]])} |"
            )

    print(f"\n## Attention core alone (forward, no_grad), {inference_size}\n")
    gflops = matmul_gflops(device, repeats, clock)
    rate = "GFLOP per CPU-second" if args.clock == "cpu" else "GFLOP/s"
    print(f"Plain fp32 matmul (2048^3) on this machine: {gflops:.0f} {rate}")
    print()
    print(f"| pairwise | ours (s) | ours {rate} | naive (s) | naive {rate} |")
    print("|---|---|---|---|---|")
    for pairwise in pairwise_list:
        r = core_gflops(pairwise, size, device, repeats, clock)
        ours = "—" if r["ours_gflops"] is None else f"{r['ours_gflops']:.0f}"
        print(
            f"| {pairwise} | {r['ours_s']:.3f} | {ours} | {r['naive_s']:.3f} | "
            f"{r['naive_gflops']:.0f} |"
        )
    print(f"\nLoad average at the end: {load_average()}")


if __name__ == "__main__":
    main()
