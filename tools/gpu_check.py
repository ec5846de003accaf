#!/usr/bin/env python
"""The GPU check: what this project does on CUDA, run and measured in one go (about 6 minutes on
one H100 / H200), with a JSON and a Markdown report.

    python tools/gpu_check.py --output output/gpu_check            # on a GPU machine
    python tools/gpu_check.py --dry-run --output /tmp/gpu_check     # the same code, CPU, tiny

Parts (each one runs even if an earlier one failed; a failure is reported with its traceback):

a. ``tests``: ``pytest -m cuda`` (tests/cuda/): the block against the float64 CPU reference
   (4 pairwise forms; float32, float16 and bfloat16 autocast; training and evaluation; forward
   and backward), empty batches, the key pooling against ``F.max_pool2d``, the fused-attention
   kernel of each Mask R-CNN shape (printed), half-precision overflow.
b. ``training``: the quickstart NL config (``configs/quickstart/mask_rcnn_nl_shapes.yaml``) for
   200 iterations in float32, then float16 and bfloat16 mixed precision: every loss finite,
   seconds per iteration, final box / mask / keypoint AP.
c. ``block``: the embedded-Gaussian block at res4, res3 and res2 of an 800x1333 image (batch 2),
   float32 and bfloat16 autocast: forward + backward time and peak memory, against the naive block
   that materialises the N x M map (``nl_detectron.layers.NaiveNonLocal``).
d. ``detector``: full-width R50-FPN Mask R-CNN at 800x1333, batch 2, bfloat16 mixed precision:
   the NL model against its baseline (same weights, NL blocks as identities), training step and
   inference time (``benchmarks/detection_models.py``).
e. ``roi_counts``: the 512-channel NL keypoint head (4 blocks) on a different number of RoIs
   every iteration: the time of each iteration after warm-up must stay flat (no per-shape kernel
   plans); the attention kernels it ran.

``--dry-run`` runs every part on the CPU at tiny sizes and a few iterations (the CUDA tests on the
CPU through ``NL_DETECTRON_CUDA_TEST_DEVICE=cpu``, float16 training skipped: it is for GPUs), so
that the script is tested on every machine and cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

# The targets of the check (issue's wording in BENCHMARKS.md, "GPU").
TARGETS = {
    "block_res3_bf16_vs_naive_fp32": 3.0,  # at least this many times faster
    "block_res3_bf16_vs_naive_bf16": 1.3,
    "block_res3_memory_vs_naive": 0.25,  # at most this fraction of the naive peak
    "detector_train_step_ratio": 1.05,  # NL / baseline, at most
    "roi_counts_max_over_median": 1.5,  # after warm-up, at most
}
PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Check:
    """The settings of one run: sizes and iteration counts of a real run or of a dry run."""

    def __init__(self, dry_run: bool, output: Path) -> None:
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.output = output
        self.train_iters = 8 if dry_run else 200
        self.repeats = 2 if dry_run else 10
        self.image = (96, 128) if dry_run else (800, 1333)
        # (name, channels, height, width) of the block benchmarks: an 800x1333 image's levels
        self.levels = (
            [("res3", 32, 12, 20)]
            if dry_run
            else [("res4", 1024, 50, 84), ("res3", 512, 100, 168), ("res2", 256, 200, 336)]
        )
        self.roi_iters = 6 if dry_run else 60
        self.roi_range = (2, 12) if dry_run else (16, 256)
        self.head_width = 32 if dry_run else 512


# ---------------------------------------------------------------------------------------------
# Helpers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_growth(fn: Callable[[], object], device: str) -> int | None:
    """Bytes the GPU allocator's peak grows by during ``fn()`` (None on the CPU)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _autocast(device: str, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device, dtype=dtype or torch.float16, enabled=dtype is not None)


def environment() -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import detectron2

        info["detectron2"] = detectron2.__version__
        from nl_detectron.compat import host_description

        info["host"] = host_description()
    except ImportError as e:
        info["detectron2"] = f"not importable: {e}"
    from common import cpu_name

    info["cpu"] = cpu_name()
    return info


# ---------------------------------------------------------------------------------------------
# a. CUDA tests


def part_tests(check: Check) -> dict[str, Any]:
    env = dict(os.environ)
    if check.dry_run:
        env["NL_DETECTRON_CUDA_TEST_DEVICE"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-s", "-rfE"]
    command += ["-p", "no:cacheprovider"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    (check.output / "gpu_check_tests.log").write_text(output)
    summary = re.findall(r"\d+ (?:passed|failed|errors?|skipped)\b[^\n]*", output)
    kernels = re.findall(r"^\.*(.* \((?:float32|float16|bfloat16), \S+\): \[.*\])", output, re.M)
    return {
        "passed": proc.returncode == 0,
        "summary": summary[-1] if summary else output[-500:],
        "attention_kernels": kernels,
        "failures": re.findall(r"^(?:FAILED|ERROR) .*$", output, re.M),
    }


# ---------------------------------------------------------------------------------------------
# b. Training the quickstart


_SPEED = re.compile(r"Overall training speed: \d+ iterations in \S+ \(([\d.]+) s / it\)")


def part_training(check: Check) -> dict[str, Any]:
    results = {}
    for precision in PRECISIONS:
        if check.dry_run and precision == "float16":
            results[precision] = {"skipped": "float16 autocast is for GPUs"}
            continue
        run = check.output / f"train_{precision}"
        iters = check.train_iters
        opts = [
            "MODEL.DEVICE", check.device,
            "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({int(iters * 0.85)}, {int(iters * 0.95)})",
            "SOLVER.WARMUP_ITERS", str(max(1, iters // 4)),
            "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
            "TEST.EVAL_PERIOD", str(iters),
            "TEST.PRECISE_BN.NUM_ITER", "2" if check.dry_run else "20",
            "OUTPUT_DIR", str(run),
        ]  # fmt: skip
        if precision != "float32":
            opts += ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision]
        if check.dry_run:
            opts += [
                "DATASETS.TRAIN",
                "('nl_shapes_mini',)",
                "DATASETS.TEST",
                "('nl_shapes_mini',)",
            ]
        command = [
            sys.executable, "tools/train_net.py", "--config-file",
            "configs/quickstart/mask_rcnn_nl_shapes.yaml", *opts,
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        entry: dict[str, Any] = {
            "returncode": proc.returncode,
            "wall_s": time.perf_counter() - start,
        }
        if proc.returncode != 0:
            entry["error"] = (proc.stdout + proc.stderr)[-2000:]
        metrics = run / "metrics.json"
        records = (
            [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if metrics.is_file()
            else []
        )
        losses = [r["total_loss"] for r in records if "total_loss" in r]
        entry["iterations_logged"] = len(losses)
        entry["losses_finite"] = bool(losses) and all(
            x == x and abs(x) < float("inf") for x in losses
        )
        evaluations = [r for r in records if "bbox/AP" in r]
        if evaluations:
            entry["AP"] = {
                task: evaluations[-1].get(f"{task}/AP") for task in ("bbox", "segm", "keypoints")
            }
        log = run / "log.txt"
        speed = _SPEED.findall(log.read_text()) if log.is_file() else []
        if speed:
            entry["s_per_iter"] = float(speed[-1])
        results[precision] = entry
    return results


# ---------------------------------------------------------------------------------------------
# c. The block against the naive block


def part_block(check: Check) -> dict[str, Any]:
    from nl_detectron.layers import NaiveNonLocal, NonLocalBlock

    device = check.device
    results = {}
    for name, channels, height, width in check.levels:
        torch.manual_seed(0)
        block = NonLocalBlock(channels).to(device)
        with torch.no_grad():
            block.out_norm.weight.fill_(1.0)  # a trained-looking block, not the identity
        naive = NaiveNonLocal(block)
        x = torch.randn(2, channels, height, width, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        for precision in ("float32", "bfloat16"):
            for impl, module in (("ours", block), ("naive", naive)):
                step = _forward_backward(module, x, grad, precision)
                results[f"{name}/{precision}/{impl}"] = _time_and_peak(step, check)
    return results


def _forward_backward(module, x, grad, precision: str) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        with _autocast(x.device.type, precision):
            out = module(x)
        out.float().backward(grad)

    return step


def _time_and_peak(step: Callable[[], None], check: Check) -> dict[str, Any]:
    """Median seconds of ``step`` after a warm-up, and its peak memory growth (or the error)."""
    try:
        step()
        peak = _peak_growth(step, check.device)
        times = [_seconds(step, check.device) for _ in range(check.repeats)]
        return {"s": statistics.median(times), "peak_bytes": peak}
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        if check.device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# d. Full-width Mask R-CNN, NL against baseline


def part_detector(check: Check) -> dict[str, Any]:
    from detection_models import MODELS, Runner, build_models, make_inputs
    from detectron2.utils.events import EventStorage

    spec = MODELS["mask_rcnn"]
    inputs = make_inputs(check.image, batch=2, keypoints=False, seed=0)
    models = build_models(spec, check.device, inputs[:1], quick=check.dry_run)
    runners = {
        variant: Runner(model, cfg, inputs, check.device, amp=True, precision=torch.bfloat16)
        for variant, (model, cfg) in models.items()
    }
    results: dict[str, Any] = {"precision": "bfloat16", "image": list(check.image), "batch": 2}
    with EventStorage():  # the training losses are logged there
        for phase in ("train_step", "inference"):
            results[phase] = _alternate(runners, phase, check)
    return results


def _alternate(runners: dict[str, Any], phase: str, check: Check) -> dict[str, float]:
    """Median seconds of ``phase`` for baseline and NL, alternating, after a warm-up each."""
    times: dict[str, list[float]] = {v: [] for v in runners}
    for runner in runners.values():  # warm-up (cuDNN picks its algorithms)
        getattr(runner, phase)()
    for r in range(check.repeats):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for variant in order:
            times[variant].append(_seconds(getattr(runners[variant], phase), check.device))
    ratios = [n / b for b, n in zip(times["baseline"], times["nl"])]
    return {
        "baseline_s": statistics.median(times["baseline"]),
        "nl_s": statistics.median(times["nl"]),
        "ratio": statistics.median(ratios),
    }


# ---------------------------------------------------------------------------------------------
# e. RoI counts that change every iteration


def part_roi_counts(check: Check) -> dict[str, Any]:
    from detectron2.layers import ShapeSpec

    from nl_detectron.layers.attention import attention_kernels_run
    from nl_detectron.modeling import NonLocalKRCNNConvDeconvUpsampleHead

    device = check.device
    width = check.head_width
    channels = 32 if check.dry_run else 256  # the FPN's width
    head = NonLocalKRCNNConvDeconvUpsampleHead(
        ShapeSpec(channels=channels, height=14, width=14),
        num_keypoints=17,
        conv_dims=[width] * 8,
    ).to(device)
    for m in head.modules():  # gates open, as after training
        if hasattr(m, "out_norm") and m.out_norm is not None:
            torch.nn.init.ones_(m.out_norm.weight)
    rng = random.Random(0)
    results = {}
    for precision in ("bfloat16", "float16"):
        if check.dry_run and precision == "float16":
            continue
        counts = [rng.randint(*check.roi_range) for _ in range(check.roi_iters)]

        steps = [_head_step(head, count, channels, precision) for count in counts]
        times = [_seconds(step, device) for step in steps]
        warm = times[len(times) // 3 :]
        kernels = attention_kernels_run(steps[0])
        results[precision] = {
            "roi_counts": counts,
            "s_per_iter": times,
            "median_after_warmup_s": statistics.median(warm),
            "max_over_median_after_warmup": max(warm) / statistics.median(warm),
            "first_iteration_s": times[0],
            "attention_kernels": sorted(k.name for k in kernels),
        }
    return results


def _head_step(head, count: int, channels: int, precision: str) -> Callable[[], None]:
    """A forward and backward pass of the keypoint head's layers on ``count`` RoIs."""
    device = next(head.parameters()).device

    def step() -> None:
        features = torch.randn(count, channels, 14, 14, device=device)
        with _autocast(device.type, precision):
            out = head.layers(features)
        out.float().square().mean().backward()

    return step


# ---------------------------------------------------------------------------------------------
# Report


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MB"


def _time_cell(entry: dict[str, Any]) -> str:
    return f"{entry['s'] * 1000:.1f} ms" if "s" in entry else entry.get("error", "-")


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) of each target the figures allow to judge."""
    out: list[tuple[str, str, bool | None]] = []
    block = report["parts"].get("block", {}).get("result") or {}
    ours, fp32, bf16 = (
        block.get(f"res3/{p}") for p in ("bfloat16/ours", "float32/naive", "bfloat16/naive")
    )
    if ours and "s" in ours:
        for naive, label, need in (
            (fp32, "naive fp32", TARGETS["block_res3_bf16_vs_naive_fp32"]),
            (bf16, "naive bf16", TARGETS["block_res3_bf16_vs_naive_bf16"]),
        ):
            if naive and "s" in naive:
                speedup = naive["s"] / ours["s"]
                out.append(
                    (
                        f"res3 bf16 block >= {need}x faster than {label}",
                        f"{speedup:.2f}x",
                        speedup >= need,
                    )
                )
        ours32, naive32 = block.get("res3/float32/ours"), fp32
        if ours32 and naive32 and ours32.get("peak_bytes") and naive32.get("peak_bytes"):
            share = ours32["peak_bytes"] / naive32["peak_bytes"]
            need = TARGETS["block_res3_memory_vs_naive"]
            out.append((f"res3 peak memory <= {need}x naive", f"{share:.3f}x", share <= need))
    detector = report["parts"].get("detector", {}).get("result") or {}
    if "train_step" in detector:
        ratio, need = detector["train_step"]["ratio"], TARGETS["detector_train_step_ratio"]
        out.append(
            (f"NL Mask R-CNN train step <= {need}x baseline", f"{ratio:.3f}x", ratio <= need)
        )
    training = report["parts"].get("training", {}).get("result") or {}
    for precision in ("float16", "bfloat16"):
        entry = training.get(precision, {})
        if "losses_finite" in entry:
            out.append(
                (
                    f"{precision} AMP training: finite losses",
                    f"{entry['iterations_logged']} logged",
                    entry["losses_finite"] and entry["returncode"] == 0,
                )
            )
    rois = report["parts"].get("roi_counts", {}).get("result") or {}
    for precision, entry in rois.items():
        ratio, need = entry["max_over_median_after_warmup"], TARGETS["roi_counts_max_over_median"]
        out.append(
            (
                f"varying RoI counts, {precision}: max/median <= {need}",
                f"{ratio:.2f}",
                ratio <= need,
            )
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    dry = " (dry run: CPU, tiny sizes; figures mean nothing)" if report["dry_run"] else ""
    lines = [
        f"# GPU check{dry}",
        "",
        f"{env['date']}: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}, Python {env['python']}, {env.get('host', env.get('detectron2'))}; "
        f"CPU {env['cpu']}. Total {report['total_s']:.0f} s.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in targets(report):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    for name, part in report["parts"].items():
        lines += ["", f"## {name} ({part['seconds']:.0f} s)", ""]
        if "error" in part:
            lines += ["```", part["error"].rstrip(), "```"]
            continue
        result = part["result"]
        if name == "block":
            lines += [
                "| level / precision | ours (s) | naive (s) | speed-up | ours peak | naive peak |",
                "|---|---|---|---|---|---|",
            ]
            for key in sorted({k.rsplit("/", 1)[0] for k in result}):
                ours, naive = result.get(f"{key}/ours", {}), result.get(f"{key}/naive", {})
                speedup = f"{naive['s'] / ours['s']:.2f}x" if "s" in ours and "s" in naive else "-"
                cells = [_time_cell(ours), _time_cell(naive), speedup]
                cells += [_mb(ours.get("peak_bytes")), _mb(naive.get("peak_bytes"))]
                lines.append(f"| {key} | {' | '.join(cells)} |")
        else:
            lines += ["```json", json.dumps(result, indent=1, default=str)[:6000], "```"]
    return "\n".join(lines) + "\n"


PARTS = {
    "tests": part_tests,
    "training": part_training,
    "block": part_block,
    "detector": part_detector,
    "roi_counts": part_roi_counts,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "output" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (a test)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args(argv)
    from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

    ignore_known_third_party_warnings()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU here; use --dry-run for the CPU rehearsal")
    args.output.mkdir(parents=True, exist_ok=True)
    check = Check(args.dry_run, args.output)
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(), "parts": {}}
    start = time.perf_counter()
    for name in args.parts:
        print(f"[gpu_check] {name} ...", flush=True)
        part_start = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            entry["result"] = PARTS[name](check)
        except Exception:
            entry["error"] = traceback.format_exc()[-4000:]
        entry["seconds"] = time.perf_counter() - part_start
        report["parts"][name] = entry
        report["total_s"] = time.perf_counter() - start
        # Written after every part: a run cut short keeps what it measured.
        (args.output / "gpu_check.json").write_text(
            json.dumps(report, indent=1, default=str) + "\n"
        )
        (args.output / "gpu_check.md").write_text(markdown(report))
        state = "FAILED" if "error" in entry else "done"
        print(f"[gpu_check] {name}: {state} in {entry['seconds']:.0f} s", flush=True)
    print((args.output / "gpu_check.md").read_text())
    return 1 if any("error" in p for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
