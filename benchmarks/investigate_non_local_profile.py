"""Where the NL models' time goes: one-off investigations beside benchmark_end_to_end.py.

On the models and inputs of the end-to-end benchmark (``detection_models.py``: each NL model
against its baseline, random weights, the NL blocks identities on the baseline's weights):

- ``profile``: the self time per operator (torch.profiler; device time on CUDA) of a training
  step and of an inference, NL vs baseline: one warm-up, then ``--repeats`` profiled runs of
  each model, alternating; the operators whose medians differ most;
- ``attention_split``: fused attention (``scaled_dot_product_attention``) at the first NL block's
  shape, as the block calls it and with the queries split into chunks moved into the batch
  dimension (one chunk per CPU thread, 8 on CUDA), forward and forward + backward;
- ``training_flops``: the FLOPs of one training step's forward and backward, of the whole model
  and of its NL blocks, with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
  convolutions and attention; one multiply-add counts as one flop, as in fvcore's inference
  count of benchmark_end_to_end.py).

    python benchmarks/investigate_non_local_profile.py --models mask_rcnn --sizes coco
    python benchmarks/investigate_non_local_profile.py --investigations training_flops
    python benchmarks/investigate_non_local_profile.py --sizes quick --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    alternate,
    device_name,
    fmt_pct,
    git_revision,
    load_average,
    progress,
    summarise,
)
from detection_models import (  # noqa: E402
    MODELS,
    SEED,
    SIZES,
    Runner,
    build_models,
    make_inputs,
)
from detectron2.utils.events import EventStorage  # noqa: E402

from nl_detectron.layers import non_local_blocks, recorded_block_inputs  # noqa: E402

INVESTIGATIONS = ("profile", "attention_split", "training_flops")


def profile_difference(runners: dict[str, Runner], repeats: int, rows: int = 20) -> None:
    """Print the self time per operator of a training step and an inference, NL vs baseline.

    Each model is profiled ``repeats`` times, alternating; the table shows per-operator medians.
    """
    cuda = runners["baseline"].device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for phase in ("train_step", "inference"):
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in runners}
        for runner in runners.values():
            getattr(runner, phase)()  # warm-up
        names = list(runners)
        for r in range(repeats):
            for variant in names if r % 2 == 0 else names[::-1]:
                with profile(activities=activities) as prof:
                    getattr(runners[variant], phase)()
                samples[variant].append(
                    {
                        e.key: e.self_device_time_total if cuda else e.self_cpu_time_total
                        for e in prof.key_averages()
                    }
                )
        ops = {op for runs in samples.values() for run in runs for op in run}
        median = {
            v: {op: statistics.median(run.get(op, 0.0) for run in runs) for op in ops}
            for v, runs in samples.items()
        }
        diff = {op: median["nl"][op] - median["baseline"][op] for op in ops}
        totals = {
            v: statistics.median(sum(run.values()) for run in runs) / 1e6
            for v, runs in samples.items()
        }
        print(
            f"\n### Profile, {phase}: self {'device' if cuda else 'CPU'} time per operator (s), "
            f"median of {repeats} (totals: baseline {totals['baseline']:.2f} s, "
            f"NL {totals['nl']:.2f} s)\n"
        )
        print("| operator | baseline | NL | NL - baseline |")
        print("|---|---|---|---|")
        for op in sorted(ops, key=lambda o: -abs(diff[o]))[:rows]:
            base, nl = median["baseline"][op], median["nl"][op]
            print(f"| {op} | {base / 1e6:.3f} | {nl / 1e6:.3f} | {diff[op] / 1e6:+.3f} |")


def attention_split_check(runner: Runner, repeats: int) -> None:
    """Time fused attention at the first NL block's shape, as called and with split queries.

    The block calls ``scaled_dot_product_attention`` with one head on ``(B, 1, HW, C')``
    queries. Splitting the queries into ``T`` chunks moved into the batch dimension (keys and
    values repeated) gives the same result, with ``B * T`` independent problems.
    """

    with recorded_block_inputs(runner.model) as calls:
        runner.inference()
    _, block, x = calls[0]
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    n = height * width
    m = -(-height // 2) * -(-width // 2) if block.sub_sample else n
    c = block.inner_channels
    device = runner.device
    q = torch.randn(batch, 1, n, c, device=device, requires_grad=True)
    k = torch.randn(batch, 1, m, c, device=device, requires_grad=True)
    v = torch.randn(batch, 1, m, c, device=device, requires_grad=True)
    grad = torch.randn(batch, 1, n, c, device=device)
    chunks = torch.get_num_threads() if device == "cpu" else 8

    def as_called(backward: bool) -> Callable[[], None]:
        def fn() -> None:
            y = F.scaled_dot_product_attention(q, k, v, scale=block.scale)
            if backward:
                y.backward(grad)

        return fn

    def split(backward: bool) -> Callable[[], None]:
        def fn() -> None:
            pad = -n % chunks
            # (B, 1, HW, C') -> (B * T, 1, HW / T, C'); keys and values repeated T times
            qs = F.pad(q, [0, 0, 0, pad]).reshape(batch * chunks, 1, (n + pad) // chunks, c)
            ks = k.repeat_interleave(chunks, dim=0)
            vs = v.repeat_interleave(chunks, dim=0)
            y = F.scaled_dot_product_attention(qs, ks, vs, scale=block.scale)
            # (B * T, 1, HW / T, C') -> (B, 1, HW, C')
            y = y.reshape(batch, 1, n + pad, c)[:, :, :n]
            if backward:
                y.backward(grad)

        return fn

    print(
        f"\n### Fused attention at the first NL block's shape: queries {list(q.shape)}, "
        f"keys/values {list(k.shape)}; split into {chunks} query chunks in the batch dimension\n"
    )
    print("| pass | as called (s) | split queries (s) | split / as called |")
    print("|---|---|---|---|")
    for name, backward in (("forward", False), ("forward + backward", True)):
        with torch.set_grad_enabled(backward):
            times = alternate(
                {"as_called": as_called(backward), "split": split(backward)}, repeats, device
            )
        t = summarise(times, "as_called", "split")["wall"]
        print(f"| {name} | {t['as_called_s']:.3f} | {t['split_s']:.3f} | {t['ratio']:.2f} |")


def _sdpa_cpu_flops(
    query: list[int], key: list[int], value: list[int], *args: Any, **kwargs: Any
) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(
    grad_out: list[int],
    query: list[int],
    key: list[int],
    value: list[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_training_flops(runner: Runner) -> dict[str, int]:
    """FLOPs of one training step's forward and backward, of the whole model and its NL blocks.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and
    attention, forward and backward; taught the CPU flash-attention kernels), halved to count
    one multiply-add as one flop like fvcore.
    """
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    }
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=mapping)
    with counter:
        runner.train_step()
    blocks = set([name for name, _ in non_local_blocks(runner.model)])
    # keys: "Global" and "<root class>.<qualified module name>"
    block_flops = sum(
        sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name.partition(".")[2] in blocks
    )
    return {"flops": counter.get_total_flops() // 2, "nl_block_flops": block_flops // 2}


def print_training_flops(model_name: str, size_name: str, flops: dict[str, dict[str, int]]) -> None:
    base, nl = flops["baseline"], flops["nl"]
    print(
        "\n### GFLOPs of one training step's forward + backward (1 FLOP = 1 multiply-add, "
        "torch FlopCounterMode)\n"
    )
    print("| model | size | training baseline | NL | + | NL blocks |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {model_name} | {size_name} | {base['flops'] / 1e9:.1f} | {nl['flops'] / 1e9:.1f} | "
        f"{fmt_pct(nl['flops'], base['flops'])} | {nl['nl_block_flops'] / 1e9:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--sizes", default="coco,small", help="comma-separated: coco, small, quick")
    parser.add_argument("--repeats", type=int, default=3, help="profiled / timed runs (median)")
    parser.add_argument("--train-batch", type=int, default=1, help="images per training step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    parser.add_argument("--rows", type=int, default=20, help="operators in each profile table")
    parser.add_argument(
        "--investigations",
        default=",".join(INVESTIGATIONS),
        help=f"comma-separated: {', '.join(INVESTIGATIONS)}",
    )
    args = parser.parse_args()
    if args.amp and args.device != "cuda":
        parser.error("--amp needs --device cuda")
    investigations = args.investigations.split(",")
    unknown = sorted(set(investigations) - set(INVESTIGATIONS))
    if unknown:
        parser.error(f"unknown investigations {unknown}; choose from {INVESTIGATIONS}")
    device = args.device
    print(
        f"# Non-local profile, {datetime.date.today()}: torch {torch.__version__}, device "
        f"{device} ({device_name(device)}), {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, amp {args.amp}, revision {git_revision()}, "
        f"load average {load_average()}",
        flush=True,
    )
    for model_name in args.models.split(","):
        spec = MODELS[model_name]
        for size_name in args.sizes.split(","):
            print(f"\n# {model_name}, {size_name}: {spec.description}", flush=True)
            inputs = make_inputs(SIZES[size_name], args.train_batch, spec.keypoints, SEED)
            progress(f"{model_name} {size_name}: building")
            models = build_models(spec, device, inputs, quick=size_name == "quick")
            runners = {
                v: Runner(model, cfg, inputs, device, args.amp)
                for v, (model, cfg) in models.items()
            }
            with EventStorage():
                if "profile" in investigations:
                    progress(f"{model_name} {size_name}: profile")
                    profile_difference(runners, args.repeats, args.rows)
                if "attention_split" in investigations:
                    progress(f"{model_name} {size_name}: fused attention, split queries")
                    attention_split_check(runners["nl"], args.repeats)
                if "training_flops" in investigations:
                    progress(f"{model_name} {size_name}: training FLOPs")
                    flops = {v: count_training_flops(r) for v, r in runners.items()}
                    print_training_flops(model_name, size_name, flops)
            del runners, models
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
