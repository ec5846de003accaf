"""End-to-end cost of the non-local blocks in Mask R-CNN and Keypoint R-CNN (paper Sec. 6).

Compares each NL model with its baseline config in one process, on the same inputs:

- ``mask_rcnn``: R50-FPN Mask R-CNN, ``configs/mask_rcnn_baseline.yaml`` vs
  ``configs/mask_rcnn_nl.yaml`` (+1 NL block before the last res4 block);
- ``keypoint_rcnn``: R101-FPN Keypoint R-CNN, ``configs/keypoint_rcnn_baseline.yaml`` vs
  ``configs/keypoint_rcnn_nl_head_only.yaml`` (+4 NL blocks in the keypoint head).

    python benchmarks/benchmark_end_to_end.py                    # COCO size and small, CPU
    python benchmarks/benchmark_end_to_end.py --quick            # tiny images, 1 repeat
    python benchmarks/benchmark_end_to_end.py --device cuda [--amp]

The models and inputs (random weights, the NL blocks identities on the baseline's weights, lr 0,
fixed RoI sampling) are those of ``detection_models.py``, which describes them. The per-operator
profile and the fused-attention experiment are in ``investigate_non_local_profile.py``.

Measured, for each model and image size:

- training step (forward + backward + optimizer step) and inference time per image (batch 1,
  ``eval()``, ``no_grad``): one warm-up each, then ``--repeats`` runs alternating baseline and NL
  (order flipped every repeat); the medians and the median of the per-repeat ratios NL/baseline,
  in wall-clock time and in CPU time of the process (all its threads: on a CPU shared with other
  jobs, this counts the work done rather than the time spent waiting for a core);
- the NL blocks alone: their inputs recorded in one model pass, then the blocks timed on them
  (forward + backward in training, forward in inference) and compared with the baseline's time;
- peak memory: on CPU, for each configuration a fresh child process builds the model, warms up,
  resets its peak resident set size (``VmHWM``, through ``/proc/self/clear_refs``), runs one
  training step (then, after another reset, one inference) and reports the peak RSS and its
  growth over the RSS just before the step. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``
  so that glibc returns freed tensor memory to the system at once and RSS follows live memory.
  On CUDA: ``torch.cuda.max_memory_allocated`` and its growth over the allocation before the step;
- parameters (all, and trainable);
- FLOPs of one inference with fvcore's counter as Detectron2's ``tools/analyze_model.py`` uses
  it (``detectron2.utils.analysis.FlopCountAnalysis``, or where that does not import, the same
  counter on an equivalent tracing wrapper; one fused multiply-add counts as one flop), with
  the handles ``nl_detectron.analysis`` registers for what fvcore lacks (fused attention,
  ``baddbmm``), and the share of the NL blocks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    alternate,
    device_name,
    fmt_mb,
    fmt_pct,
    git_revision,
    load_average,
    measure_peak,
    medians,
    progress,
    run_memory_child,
    summarise,
)
from detection_models import (  # noqa: E402
    MODELS,
    SEED,
    SIZES,
    VARIANTS,
    Runner,
    autocast,
    build_models,
    make_inputs,
)
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402

from nl_detectron.layers import non_local_blocks, recorded_block_inputs  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The NL blocks alone


def blocks_alone(runner: Runner, repeats: int) -> dict[str, Any]:
    """Median seconds of the NL blocks alone on the inputs they get in the model.

    Per clock (``"wall"``, ``"cpu"``): ``train``, forward + backward (training mode) of every
    block call of one training step; ``inference``, forward (eval, no_grad) of every block call
    of one inference. Also the input shapes of those calls.
    """
    with recorded_block_inputs(runner.model) as train_calls:
        runner.train_step()
    with recorded_block_inputs(runner.model) as test_calls:
        runner.inference()

    def train() -> None:
        for _, block, x in train_calls:
            block.train()
            x = x.requires_grad_(True)
            with autocast(runner.device, runner.amp):
                y = block(x)
            y.backward(torch.ones_like(y))
            x.grad = None
            block.zero_grad(set_to_none=True)

    def inference() -> None:
        with torch.no_grad(), autocast(runner.device, runner.amp):
            for _, block, x in test_calls:
                block.eval()
                block(x)

    times = alternate({"train": train, "inference": inference}, repeats, runner.device)
    return {clock: medians(by_name) for clock, by_name in times.items()} | {
        "train_calls": [list(x.shape) for _, _, x in train_calls],
        "inference_calls": [list(x.shape) for _, _, x in test_calls],
    }


# ---------------------------------------------------------------------------------------------
# Peak memory


def measure_memory(
    model_name: str, variant: str, size_name: str, batch: int, device: str, amp: bool
) -> dict[str, int]:
    """Peak memory of one training step and one inference of one configuration."""
    spec = MODELS[model_name]
    inputs = make_inputs(SIZES[size_name], batch, spec.keypoints, SEED)
    model, cfg = build_models(spec, device, inputs, [variant], quick=size_name == "quick")[variant]
    runner = Runner(model, cfg, inputs, device, amp)
    with EventStorage():
        runner.train_step()  # warm-up: lazy initialisation, optimizer state
        train = measure_peak(runner.train_step, device)
        runner.inference()
        inference = measure_peak(runner.inference, device)
    return {
        "train_peak_bytes": train["peak_bytes"],
        "train_growth_bytes": train["growth_bytes"],
        "inference_peak_bytes": inference["peak_bytes"],
        "inference_growth_bytes": inference["growth_bytes"],
    }


def peak_memory(
    model_name: str, variant: str, size_name: str, batch: int, device: str, amp: bool
) -> dict[str, int]:
    """:func:`measure_memory` in a fresh child process on CPU (in this process on CUDA)."""
    if device == "cuda":
        return measure_memory(model_name, variant, size_name, batch, device, amp)
    return run_memory_child(__file__, model_name, variant, size_name, str(batch))[-1]


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs


def count_parameters(model: nn.Module) -> dict[str, int]:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


class TracedDetector(nn.Module):
    """A detector as a function of one image tensor, with its detections as a tuple of tensors.

    What ``detectron2.export.TracingAdapter`` does for ``detectron2.utils.analysis``, which does
    not import here: Detectron2 v0.6's ``detectron2.export`` imports ``caffe2``, which PyTorch no
    longer ships. The model is its ``model`` submodule, as in ``TracingAdapter``.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.height, self.width = inputs["height"], inputs["width"]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        (output,) = self.model([{"image": image, "height": self.height, "width": self.width}])
        instances = output["instances"]
        fields = ("scores", "pred_classes", "pred_masks", "pred_keypoints")
        return (instances.pred_boxes.tensor,) + tuple(
            instances.get(f) for f in fields if instances.has(f)
        )


def flop_counter(model: nn.Module, inputs: list[dict[str, Any]]) -> FlopCountAnalysis:
    """``detectron2.utils.analysis.FlopCountAnalysis(model, inputs)``, or its equivalent.

    Both trace one inference with fvcore and count the same operators; Detectron2's class also
    silences the warnings of operators it deliberately does not count (element-wise ops,
    pooling, NMS), which count zero either way.
    """
    try:
        from detectron2.utils.analysis import FlopCountAnalysis as Detectron2FlopCountAnalysis

        return Detectron2FlopCountAnalysis(model, inputs)
    except ImportError:
        traced = TracedDetector(model, inputs[0])
        return FlopCountAnalysis(traced, (inputs[0]["image"],))


def count_flops(runner: Runner) -> dict[str, Any]:
    """Inference FLOPs of the whole model and of its NL blocks (fvcore's flop counter)."""
    runner.model.eval()
    with torch.no_grad():
        # fused attention and baddbmm are counted by the handles nl_detectron.analysis adds
        flops = flop_counter(runner.model, runner.test_inputs)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = flops.total()
        by_module = flops.by_module()
        unsupported = dict(flops.unsupported_ops())
    blocks = [name for name, _ in non_local_blocks(runner.model)]
    # Both tracing wrappers hold the model as their "model" submodule.
    block_flops = sum(by_module.get(f"model.{name}", 0) for name in blocks)
    return {"flops": total, "nl_block_flops": block_flops, "unsupported_ops": unsupported}


# ---------------------------------------------------------------------------------------------
# Report


def _ratio_cell(t: dict[str, float]) -> str:
    """``median (min–max)`` of the per-repeat ratios."""
    return f"{t['ratio']:.3f} ({t['ratio_min']:.3f}–{t['ratio_max']:.3f})"


def _timing_cells(row: dict[str, Any], phase: str) -> str:
    """Baseline, NL, ratios and the blocks-alone share of ``phase`` (train / inference)."""
    wall, cpu = row[phase]["wall"], row[phase]["cpu"]
    blocks = row["blocks"]
    return (
        f"{wall['baseline_s']:.3f} | {wall['nl_s']:.3f} | {_ratio_cell(wall)} | "
        f"{_ratio_cell(cpu)} | {blocks['wall'][phase]:.3f} | "
        f"{100 * blocks['wall'][phase] / wall['baseline_s']:.1f}% | "
        f"{100 * blocks['cpu'][phase] / cpu['baseline_s']:.1f}%"
    )


def print_tables(results: list[dict[str, Any]], repeats: int) -> None:
    print(
        f"\n## Training step (forward + backward + optimizer step), median of {repeats}; wall "
        "clock, and the NL / baseline ratio also in CPU time of the process\n"
    )
    print(
        "| model | size | batch | baseline (s) | NL (s) | NL / baseline | "
        "NL / baseline, CPU time | NL blocks alone (s) | blocks alone / baseline | "
        "same, CPU time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {_timing_cells(r, 'train')} |")
    print(
        f"\n## Inference per image (batch 1), median of {repeats}; wall clock, and the NL / "
        "baseline ratio also in CPU time of the process\n"
    )
    print(
        "| model | size | detections (same in both) | baseline (s) | NL (s) | NL / baseline | "
        "NL / baseline, CPU time | NL blocks alone (s) | blocks alone / baseline | "
        "same, CPU time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = "yes" if r["same_detections"] else "NO"
        print(
            f"| {r['model']} | {r['size']} | {r['detections']} ({same}) | "
            f"{_timing_cells(r, 'inference')} |"
        )
    if any(r.get("memory") for r in results):
        print("\n## Peak memory (MB): peak, and growth during the step over the memory before it\n")
        print(
            "| model | size | batch | train peak baseline | NL | train growth baseline | NL | "
            "inference peak baseline | NL | inference growth baseline | NL |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            if not r.get("memory"):
                continue
            b, n = r["memory"]["baseline"], r["memory"]["nl"]
            cells = [
                f"{fmt_mb(b[key])} | {fmt_mb(n[key])} ({fmt_pct(n[key], b[key])})"
                for key in (
                    "train_peak_bytes",
                    "train_growth_bytes",
                    "inference_peak_bytes",
                    "inference_growth_bytes",
                )
            ]
            print(f"| {r['model']} | {r['size']} | {r['batch']} | " + " | ".join(cells) + " |")
    print(
        "\n## Parameters and GFLOPs (1 FLOP = 1 multiply-add): one inference (fvcore, as "
        "Detectron2's analyze_model)\n"
    )
    print(
        "| model | size | params baseline (M) | NL (M) | params + | inference baseline | NL | "
        "+ | NL blocks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p, f = r["params"], r.get("flops")
        flops = (
            "— | — | — | —"
            if not f
            else (
                f"{f['baseline']['flops'] / 1e9:.1f} | {f['nl']['flops'] / 1e9:.1f} | "
                f"{fmt_pct(f['nl']['flops'], f['baseline']['flops'])} | "
                f"{f['nl']['nl_block_flops'] / 1e9:.2f}"
            )
        )
        print(
            f"| {r['model']} | {r['size']} | {p['baseline']['params'] / 1e6:.2f} | "
            f"{p['nl']['params'] / 1e6:.2f} | "
            f"{fmt_pct(p['nl']['params'], p['baseline']['params'])} | {flops} |"
        )


def run(args: argparse.Namespace) -> None:
    device = args.device
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    repeats = 1 if args.quick else args.repeats
    print(
        f"# End-to-end benchmark, {datetime.date.today()}: torch {torch.__version__}, device "
        f"{device} ({device_name(device)}), "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, amp {args.amp}, "
        f"revision {git_revision()}, load average {load_average()}",
        flush=True,
    )
    results = []
    for model_name in args.models.split(","):
        spec = MODELS[model_name]
        print(f"\n# {model_name}: {spec.description}", flush=True)
        for size_name in sizes:
            batch = args.train_batch
            inputs = make_inputs(SIZES[size_name], batch, spec.keypoints, SEED)
            progress(f"{model_name} {size_name}: building")
            models = build_models(spec, device, inputs, quick=size_name == "quick")
            runners = {
                v: Runner(model, cfg, inputs, device, args.amp)
                for v, (model, cfg) in models.items()
            }
            row: dict[str, Any] = {"model": model_name, "size": size_name, "batch": batch}
            with EventStorage():
                outputs = {v: r.inference()[0]["instances"] for v, r in runners.items()}
                row["same_detections"] = bool(
                    torch.equal(
                        outputs["baseline"].pred_boxes.tensor, outputs["nl"].pred_boxes.tensor
                    )
                )
                row["detections"] = len(outputs["baseline"])
                progress(f"{model_name} {size_name}: training steps")
                row["train"] = summarise(
                    alternate({v: r.train_step for v, r in runners.items()}, repeats, device)
                )
                progress(f"{model_name} {size_name}: inference")
                row["inference"] = summarise(
                    alternate({v: r.inference for v, r in runners.items()}, repeats, device)
                )
                progress(f"{model_name} {size_name}: NL blocks alone")
                row["blocks"] = blocks_alone(runners["nl"], repeats)
            row["params"] = {v: count_parameters(m) for v, (m, _) in models.items()}
            if not args.skip_flops:
                progress(f"{model_name} {size_name}: FLOPs")
                row["flops"] = {v: count_flops(r) for v, r in runners.items()}
            if not args.skip_memory:
                progress(f"{model_name} {size_name}: peak memory (child processes)")
                row["memory"] = {
                    v: peak_memory(model_name, v, size_name, batch, device, args.amp)
                    for v in VARIANTS
                }
            print(json.dumps(row), flush=True)
            results.append(row)
            del runners, models
    print(f"\nload average at the end: {load_average()}")
    print_tables(results, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--sizes", default="coco,small", help="comma-separated: coco, small, quick")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--train-batch", type=int, default=1, help="images per training step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny images, fewer proposals and boxes, 1 repeat"
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.amp and args.device != "cuda":
        parser.error("--amp needs --device cuda")
    if args.memory_child:
        model_name, variant, size_name, batch = args.memory_child
        memory = measure_memory(model_name, variant, size_name, int(batch), "cpu", False)
        print(json.dumps(memory))
        return
    run(args)


if __name__ == "__main__":
    main()
