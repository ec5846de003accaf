"""End-to-end cost of the non-local blocks in Mask R-CNN and Keypoint R-CNN (paper Sec. 6).

Compares each NL model with its baseline config in one process, on the same inputs:

- ``mask_rcnn``: R50-FPN Mask R-CNN, ``configs/mask_rcnn_baseline.yaml`` vs
  ``configs/mask_rcnn_nl.yaml`` (+1 NL block before the last res4 block);
- ``keypoint_rcnn``: R101-FPN Keypoint R-CNN, ``configs/keypoint_rcnn_baseline.yaml`` vs
  ``configs/keypoint_rcnn_nl_head_only.yaml`` (+4 NL blocks in the keypoint head).

    python benchmarks/benchmark_end_to_end.py                    # COCO size and small, CPU
    python benchmarks/benchmark_end_to_end.py --quick            # tiny images, 1 repeat
    python benchmarks/benchmark_end_to_end.py --device cuda [--amp]
    python benchmarks/benchmark_end_to_end.py --models mask_rcnn --sizes coco --profile

Set-up. Random weights (``MODEL.WEIGHTS ""``); the NL model gets every weight of the baseline
and its NL blocks are identities at initialisation (zero gamma), so both models compute the same
proposals, RoIs and detections and differ only by the work of the NL blocks. The frozen batch
norms of the random ResNet get the statistics of their inputs on the benchmark images, as
pretrained ones would have (otherwise a random R101 overflows). ``SCORE_THRESH_TEST = 0``
makes inference run the mask / keypoint head on ``TEST.DETECTIONS_PER_IMAGE`` (100) boxes per
image, as a trained model typically does on COCO. Training uses the config's optimizer
(``detectron2.solver.build_optimizer``, SGD with momentum and weight decay) with lr 0, which does
the same arithmetic as any lr but keeps the weights, and with a fixed seed before each step the
sampled RoIs, identical across repeats and models. Inputs: random uint8 images with 5 random
ground-truth boxes, polygon masks and 17 visible keypoints each.

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
  handles added for ``aten::scaled_dot_product_attention`` (``L * S * (E + Ev)`` per batch and
  head) and ``aten::baddbmm``, which fvcore lacks, and the share of the NL blocks; and of one
  training step's forward and backward with ``torch.utils.flop_counter.FlopCounterMode`` (same
  convention).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.structures import Boxes, Instances, Keypoints, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402
from machine import cpu_name, load_average, peak_rss  # noqa: E402

from nl_detectron import NonLocalBlock, add_nonlocal_config  # noqa: E402

VARIANTS = ("baseline", "nl")
NUM_GT = 5  # ground-truth instances per training image
NUM_KEYPOINTS = 17
SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """A baseline config and its NL counterpart, paths relative to the repository root."""

    baseline: str
    nl: str
    description: str
    keypoints: bool

    def config(self, variant: str) -> str:
        return self.baseline if variant == "baseline" else self.nl


MODELS = {
    "mask_rcnn": ModelSpec(
        "configs/mask_rcnn_baseline.yaml",
        "configs/mask_rcnn_nl.yaml",
        "R50-FPN Mask R-CNN, +1 NL block before the last res4 block",
        keypoints=False,
    ),
    "keypoint_rcnn": ModelSpec(
        "configs/keypoint_rcnn_baseline.yaml",
        "configs/keypoint_rcnn_nl_head_only.yaml",
        "R101-FPN Keypoint R-CNN, +4 NL blocks in the keypoint head",
        keypoints=True,
    ),
}

# (height, width) of the input images: COCO's 800-pixel shorter side, a small size, a tiny one.
SIZES = {"coco": (800, 1216), "small": (320, 480), "quick": (128, 192)}


# ---------------------------------------------------------------------------------------------
# Models and inputs


def build_cfg(spec: ModelSpec, variant: str, device: str, quick: bool = False) -> CfgNode:
    """The config of ``spec``'s baseline or NL model, set up for a random-weight benchmark."""
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(str(ROOT / spec.config(variant)))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    # Every box reaches the mask / keypoint head (100 per image), as with a trained model.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    # lr 0: the step's arithmetic is unchanged, the weights (hence the sampled RoIs) stay fixed.
    cfg.SOLVER.BASE_LR = 0.0
    if quick:
        # Fewer proposals, sampled RoIs and detections: a smoke run in seconds.
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def build_models(
    spec: ModelSpec,
    device: str,
    calibration: list[dict[str, Any]],
    variants: Sequence[str] = VARIANTS,
    quick: bool = False,
) -> dict[str, tuple[nn.Module, CfgNode]]:
    """The baseline and/or NL model, sharing every baseline weight; NL blocks are identities.

    The baseline's frozen batch norms are calibrated on ``calibration`` first (see
    :func:`calibrate_frozen_batch_norms`). Returns ``{variant: (model, cfg)}``.
    """
    torch.manual_seed(SEED)
    cfg = build_cfg(spec, "baseline", device, quick)
    baseline = build_model(cfg)
    calibrate_frozen_batch_norms(baseline, calibration)
    models = {}
    if "baseline" in variants:
        models["baseline"] = (baseline, cfg)
    if "nl" in variants:
        nl_cfg = build_cfg(spec, "nl", device, quick)
        nl = build_model(nl_cfg)
        result = nl.load_state_dict(baseline.state_dict(), strict=False)
        blocks = non_local_block_names(nl)
        stray = [k for k in result.missing_keys if not k.startswith(tuple(b + "." for b in blocks))]
        if result.unexpected_keys or stray or not blocks:
            raise RuntimeError(
                f"{spec.nl} is not {spec.baseline} plus NL blocks: NL blocks {blocks}, missing "
                f"{stray}, unexpected {result.unexpected_keys}."
            )
        models["nl"] = (nl, nl_cfg)
    return models


def calibrate_frozen_batch_norms(model: nn.Module, inputs: list[dict[str, Any]]) -> None:
    """Give every ``FrozenBatchNorm2d`` the per-channel statistics of its input on ``inputs``.

    With random weights and the identity statistics of a fresh frozen BN, activations grow
    block after block until a deep ResNet overflows (R101: non-finite boxes, no detections).
    One backbone pass in which each frozen BN first takes its input's mean and variance
    normalises them as pretrained statistics would. Only values change, not the work.
    """
    from detectron2.layers import FrozenBatchNorm2d

    def take_statistics(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [
        m.register_forward_pre_hook(take_statistics)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    model.eval()
    try:
        with torch.no_grad():
            model.backbone(model.preprocess_image(inputs).tensor)
    finally:
        for handle in handles:
            handle.remove()


def non_local_block_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's ``NonLocalBlock`` modules."""
    return [name for name, m in model.named_modules() if isinstance(m, NonLocalBlock)]


def _polygon(box: Sequence[float], vertices: int = 16) -> np.ndarray:
    """An ellipse inscribed in ``box`` (x0, y0, x1, y1), as a flat COCO polygon."""
    x0, y0, x1, y1 = box
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    xs = (x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(angles)
    ys = (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(angles)
    return np.stack([xs, ys], axis=1).ravel()


def make_inputs(
    size: tuple[int, int], batch: int, keypoints: bool, seed: int
) -> list[dict[str, Any]]:
    """``batch`` Detectron2 input dicts: a random uint8 image and ``NUM_GT`` random instances."""
    height, width = size
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        # boxes of 1/8 to 1/2 of the image side
        wh = torch.rand(NUM_GT, 2, generator=g) * 0.375 + 0.125
        xy = torch.rand(NUM_GT, 2, generator=g) * (1 - wh)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([xy * scale, (xy + wh) * scale], dim=1)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        # Keypoint R-CNN has one class (person); Mask R-CNN COCO's 80.
        num_classes = 1 if keypoints else 80
        instances.gt_classes = torch.randint(0, num_classes, (NUM_GT,), generator=g)
        instances.gt_masks = PolygonMasks([[_polygon(b)] for b in boxes.tolist()])
        if keypoints:
            # (G, 2) + (G, 1, 2) * (G, K, 2) -> (G, K, 2) points inside the boxes, visibility 2
            points = boxes[:, None, :2] + (boxes[:, None, 2:] - boxes[:, None, :2]) * torch.rand(
                NUM_GT, NUM_KEYPOINTS, 2, generator=g
            )
            visible = torch.full((NUM_GT, NUM_KEYPOINTS, 1), 2.0)
            instances.gt_keypoints = Keypoints(torch.cat([points, visible], dim=2))
        inputs.append({"image": image, "height": height, "width": width, "instances": instances})
    return inputs


def inference_inputs(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first input without its ground truth: one image, as at test time."""
    return [{k: v for k, v in inputs[0].items() if k != "instances"}]


# ---------------------------------------------------------------------------------------------
# Steps


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, amp: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA with ``--amp``, else nothing."""
    if amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class Runner:
    """One model with its optimizer: a training step and an inference on fixed inputs."""

    def __init__(
        self,
        model: nn.Module,
        cfg: CfgNode,
        train_inputs: list[dict[str, Any]],
        device: str,
        amp: bool,
    ) -> None:
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.train_inputs = train_inputs
        self.test_inputs = inference_inputs(train_inputs)
        self.device = device
        self.amp = amp

    def train_step(self) -> dict[str, Tensor]:
        """Forward + backward + optimizer step; the same RoIs are sampled every time."""
        self.model.train()
        torch.manual_seed(SEED)
        with autocast(self.device, self.amp):
            losses = self.model(self.train_inputs)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return losses

    def inference(self) -> list[dict[str, Any]]:
        """Detections for one image."""
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.model(self.test_inputs)


CLOCKS = ("wall", "cpu")


def timed(fn: Callable[[], object], device: str) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``, and the CPU seconds of this process (all threads)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each run by clock and name: one warm-up each, then repeats alternating, the
    order flipped each time. ``{"wall": {name: [...]}, "cpu": {name: [...]}}``."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {c: {name: [] for name in names} for c in CLOCKS}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds = timed(fns[name], device)
            for clock in CLOCKS:
                times[clock][name].append(seconds[clock])
    return times


def summarise(
    times: dict[str, dict[str, list[float]]], reference: str = "baseline", other: str = "nl"
) -> dict[str, dict[str, float]]:
    """Per clock: medians (``<name>_s``), and the median, min and max over repeats of the ratio
    other / reference of the runs of one repeat."""
    summary = {}
    for clock, by_name in times.items():
        ratios = [o / r for r, o in zip(by_name[reference], by_name[other])]
        summary[clock] = {
            f"{reference}_s": statistics.median(by_name[reference]),
            f"{other}_s": statistics.median(by_name[other]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return summary


# ---------------------------------------------------------------------------------------------
# The NL blocks alone


@contextlib.contextmanager
def recorded_block_inputs(model: nn.Module) -> Iterator[list[tuple[NonLocalBlock, Tensor]]]:
    """Record ``(block, input)`` of every ``NonLocalBlock`` call while the context is open."""
    calls: list[tuple[NonLocalBlock, Tensor]] = []
    handles = [
        m.register_forward_pre_hook(
            lambda module, args: calls.append((module, args[0].detach().clone()))
        )
        for m in model.modules()
        if isinstance(m, NonLocalBlock)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


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
        for block, x in train_calls:
            block.train()
            x = x.requires_grad_(True)
            with autocast(runner.device, runner.amp):
                y = block(x)
            y.backward(torch.ones_like(y))
            x.grad = None
            block.zero_grad(set_to_none=True)

    def inference() -> None:
        with torch.no_grad(), autocast(runner.device, runner.amp):
            for block, x in test_calls:
                block.eval()
                block(x)

    times = alternate({"train": train, "inference": inference}, repeats, runner.device)
    return {
        clock: {name: statistics.median(ts) for name, ts in by_name.items()}
        for clock, by_name in times.items()
    } | {
        "train_calls": [list(x.shape) for _, x in train_calls],
        "inference_calls": [list(x.shape) for _, x in test_calls],
    }


# ---------------------------------------------------------------------------------------------
# Peak memory


def _peak(fn: Callable[[], object], device: str) -> dict[str, int]:
    """Peak memory of ``fn()``: absolute, and growth over the memory in use just before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "growth_bytes": peak - before}
    peak, growth = peak_rss(fn)
    return {"peak_bytes": peak, "growth_bytes": growth}


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
        train = _peak(runner.train_step, device)
        runner.inference()
        inference = _peak(runner.inference, device)
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
    cmd = [sys.executable, __file__, "--memory-child", model_name, variant, size_name, str(batch)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOPs (multiply-adds) of ``scaled_dot_product_attention``: ``q k^T`` and ``p v``."""
    q, k, v = (get_shape(i) for i in inputs[:3])
    # q (..., L, E), k (..., S, E), v (..., S, Ev)
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def baddbmm_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOPs (multiply-adds) of ``baddbmm(input, batch1, batch2)``: ``(B, n, m) @ (B, m, p)``."""
    (b, n, m), p = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return b * n * m * p


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
        flops = flop_counter(runner.model, runner.test_inputs)
        flops.set_op_handle(
            "aten::scaled_dot_product_attention", sdpa_flop_jit, "aten::baddbmm", baddbmm_flop_jit
        )
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = flops.total()
        by_module = flops.by_module()
        unsupported = dict(flops.unsupported_ops())
    blocks = non_local_block_names(runner.model)
    # Both tracing wrappers hold the model as their "model" submodule.
    block_flops = sum(by_module.get(f"model.{name}", 0) for name in blocks)
    return {"flops": total, "nl_block_flops": block_flops, "unsupported_ops": unsupported}


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
    blocks = set(non_local_block_names(runner.model))
    # keys: "Global" and "<root class>.<qualified module name>"
    block_flops = sum(
        sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name.partition(".")[2] in blocks
    )
    return {"flops": counter.get_total_flops() // 2, "nl_block_flops": block_flops // 2}


# ---------------------------------------------------------------------------------------------
# Profile


def profile_difference(runners: dict[str, Runner], repeats: int, rows: int = 20) -> None:
    """Print the self time per operator of a training step and an inference, NL vs baseline.

    Each model is profiled ``repeats`` times, alternating; the table shows per-operator medians.
    """
    from torch.profiler import ProfilerActivity, profile

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
    import torch.nn.functional as F

    with recorded_block_inputs(runner.model) as calls:
        runner.inference()
    block, x = calls[0]
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


# ---------------------------------------------------------------------------------------------
# Report


def fmt_mb(n: Optional[float]) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


def fmt_pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%" if old else "—"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def git_revision() -> str:
    """The checkout's revision, and the last commit of the NL block's source (+ "modified")."""
    block = "nl_detectron/non_local_block.py"
    try:
        block_commit = _git("log", "-1", "--format=%h", "--", block)
        modified = _git("status", "--porcelain", "--", block) != ""
        return (
            f"{_git('describe', '--always', '--dirty')}, {block} at {block_commit}"
            f"{' + uncommitted changes' if modified else ''}"
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
        "Detectron2's analyze_model) and one training step's forward + backward "
        "(torch FlopCounterMode)\n"
    )
    print(
        "| model | size | params baseline (M) | NL (M) | params + | inference baseline | NL | "
        "+ | NL blocks | training baseline | NL | + | NL blocks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["params"]
        cells = []
        for key in ("flops", "training_flops"):
            f = r.get(key)
            cells.append(
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
            f"{fmt_pct(p['nl']['params'], p['baseline']['params'])} | " + " | ".join(cells) + " |"
        )


def progress(message: str) -> None:
    """A time-stamped progress line on standard error."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    device = args.device
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    repeats = 1 if args.quick else args.repeats
    print(
        f"# End-to-end benchmark, {datetime.date.today()}: torch {torch.__version__}, device "
        f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else cpu_name()}), "
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
                if args.profile:
                    progress(f"{model_name} {size_name}: profile")
                    profile_difference(runners, max(repeats, 3))
                    attention_split_check(runners["nl"], max(repeats, 3))
            row["params"] = {v: count_parameters(m) for v, (m, _) in models.items()}
            if not args.skip_flops:
                progress(f"{model_name} {size_name}: FLOPs")
                row["flops"] = {v: count_flops(r) for v, r in runners.items()}
                with EventStorage():
                    row["training_flops"] = {v: count_training_flops(r) for v, r in runners.items()}
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
    parser.add_argument("--profile", action="store_true", help="print per-operator differences")
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
