"""Time and peak memory of one non-local block against the number of positions N, ours vs naive.

A 1024-channel block (res4's width), batch 1, on feature maps of res4's aspect ratio from
16x24 up to ``--max-positions``; for each pairwise function, NonLocalBlock and the naive block
that materialises the N x M map (``nl_detectron.layers.NaiveNonLocal``), set up as in
``benchmark_non_local_block.py``, whose block set-up and memory pass this script imports. Writes
the figure (log-log: time of a forward + backward pass, and its peak memory) and prints the
measurements.

    python benchmarks/plot_block_scaling.py                       # -> docs/images/block_scaling.png
    python benchmarks/plot_block_scaling.py --quick --output /tmp/block_scaling.png

Time: median of ``--repeats`` forward + backward passes after one warm-up, ours and naive
alternating. Peak memory: one child process (started with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that glibc returns freed tensor memory at once) measures each case in turn: it resets its peak
resident set size (``VmHWM``, through ``/proc/self/clear_refs``), runs one forward + backward
pass and reports the growth of the peak over the resident size just before, i.e. what the pass
allocates beyond the weights, the input and the output gradient. On CUDA:
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_non_local_block import (  # noqa: E402
    Size,
    forward_backward,
    make_block,
    make_module,
    memory_child,
    pass_peak_bytes,
)
from common import ROOT, alternate, fmt_mb, medians, run_memory_child  # noqa: E402

CHANNELS = 1024
# Feature maps of res4's aspect ratio (800x1216 image: 50x76); N = H * W.
GRIDS = ((16, 24), (24, 36), (32, 48), (50, 76), (64, 96), (80, 120), (100, 152), (128, 192))
QUICK_GRIDS = ((4, 6), (8, 12), (12, 18))
IMPLS = ("ours", "naive")


def grid_size(grid: tuple[int, int], channels: int) -> Size:
    return Size(1, channels, grid[0], grid[1])


def measure_time(pairwise: str, size: Size, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of a forward + backward pass of our block and the naive one."""
    block = make_block(pairwise, size, device)
    x = torch.randn(size.shape(), device=device, requires_grad=True)
    grad = torch.randn(size.shape(), device=device)
    modules = {impl: make_module(impl, block) for impl in IMPLS}
    fns = {
        impl: (lambda m=module: forward_backward(m, x, grad)) for impl, module in modules.items()
    }
    return medians(alternate(fns, repeats, device)["wall"])


def measure_memory(
    cases: list[tuple[str, str, Size]], device: str
) -> dict[tuple[str, str, int], int]:
    """Peak bytes of each ``(pairwise, impl, size)``, keyed by ``(pairwise, impl, N)``."""
    peaks = {}
    if device == "cuda":
        for pairwise, impl, size in cases:
            module = make_module(impl, make_block(pairwise, size, device))
            peaks[pairwise, impl, size.height * size.width] = pass_peak_bytes(module, size, device)
            del module
        return peaks
    spec = json.dumps([[p, i, list(s.shape())] for p, i, s in cases])
    for row in run_memory_child(__file__, spec):
        pairwise, impl, shape = row["case"]
        peaks[pairwise, impl, shape[2] * shape[3]] = row["peak_bytes"]
    return peaks


def plot(rows: list[dict], pairwise_list: list[str], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    colors = dict(zip(pairwise_list, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for pairwise in pairwise_list:
        for impl, style in (("ours", "-"), ("naive", "--")):
            points = [r for r in rows if r["pairwise"] == pairwise and r["impl"] == impl]
            n = [r["positions"] for r in points]
            label = f"{pairwise.replace('_', ' ')}, {impl}"
            kwargs = {"color": colors[pairwise], "linestyle": style, "marker": "o", "ms": 3}
            ax_time.plot(n, [r["seconds"] for r in points], label=label, **kwargs)
            ax_mem.plot(n, [r["peak_bytes"] / 2**20 for r in points], label=label, **kwargs)
    for ax, ylabel in ((ax_time, "forward + backward (s)"), (ax_mem, "peak memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("positions N = H x W (M = N / 4 keys)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", linewidth=0.3)
    ax_time.axvline(50 * 76, color="gray", linewidth=0.8, linestyle=":")
    ax_mem.axvline(50 * 76, color="gray", linewidth=0.8, linestyle=":")
    ax_mem.text(50 * 76, ax_mem.get_ylim()[1], " res4, 800x1216", va="top", fontsize=7)
    ax_mem.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairwise", default="embedded_gaussian,dot_product")
    parser.add_argument("--max-positions", type=int, default=100 * 152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", type=Path, default=ROOT / "docs/images/block_scaling.png")
    parser.add_argument("--quick", action="store_true", help="tiny maps and channels, 1 repeat")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    channels = 64 if args.quick else CHANNELS
    grids = QUICK_GRIDS if args.quick else GRIDS
    sizes = [grid_size(g, channels) for g in grids if g[0] * g[1] <= args.max_positions]
    repeats = 1 if args.quick else args.repeats
    pairwise_list = args.pairwise.split(",")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"# Block scaling, {datetime.date.today()}: torch {torch.__version__}, {device_name}, "
        f"{torch.get_num_threads()} threads, {channels} channels, batch 1, median of {repeats}",
        flush=True,
    )
    cases = [(p, impl, s) for p in pairwise_list for s in sizes for impl in IMPLS]
    memory = measure_memory(cases, args.device)
    rows = []
    for pairwise in pairwise_list:
        for size in sizes:
            seconds = measure_time(pairwise, size, repeats, args.device)
            n = size.height * size.width
            for impl in IMPLS:
                row = {
                    "pairwise": pairwise,
                    "impl": impl,
                    "grid": [size.height, size.width],
                    "positions": n,
                    "seconds": seconds[impl],
                    "peak_bytes": memory[pairwise, impl, n],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    print("\n| pairwise | H x W | N | ours (s) | naive (s) | ours (MB) | naive (MB) |")
    print("|---|---|---|---|---|---|---|")
    for pairwise in pairwise_list:
        for size in sizes:
            n = size.height * size.width
            ours, naive = (
                next(
                    r
                    for r in rows
                    if (r["pairwise"], r["impl"], r["positions"]) == (pairwise, i, n)
                )
                for i in IMPLS
            )
            print(
                f"| {pairwise} | {size.height}x{size.width} | {n} | {ours['seconds']:.3f} | "
                f"{naive['seconds']:.3f} | {fmt_mb(ours['peak_bytes'])} | "
                f"{fmt_mb(naive['peak_bytes'])} |"
            )
    version = torch.__version__.split("+")[0]
    title = (
        f"NonLocalBlock vs naive (N x M map), {channels} channels, batch 1, fp32, "
        f"{device_name} ({torch.get_num_threads()} threads), torch {version}"
    )
    plot(rows, pairwise_list, args.output, title)
    print(f"\nwrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
