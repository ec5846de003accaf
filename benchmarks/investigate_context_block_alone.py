#!/usr/bin/env python
"""Can the block learn the ``pair`` matching from a pretext detector's features, without the rest
of the detector? The features are held fixed: p2 of the cached pretext detector (python
tools/pretrain_context.py --pretext PRETEXT), for the 1000 training and 100 validation images of
``pair``. A new block on them and a new classifier of each disc's category (from the block's
output around the disc) are trained on the discs' categories, 8 images a step, as the detector's
schedule has them; nothing else trains.

- ``--optimizer``: ``sgd`` (momentum 0.9, as the detector; the learning rate is the detector's
  NL parameters', 10 x 0.05) or ``adamw`` (what MODEL.NONLOCAL.OPTIMIZER "AdamW" gives them).
- ``--background K``: K random points per disc, anywhere in the image, classified too (a fourth
  class), as the detector's RoI heads classify sampled background boxes.
- ``--head``: ``center`` (a linear classifier of the 3 x 3 cells around the disc's centre),
  ``roi_linear`` (a linear classifier of a 7 x 7 RoIAlign of the disc's box, as the detector's
  pooler), ``roi_1fc`` or ``roi_2fc`` (the same RoI through one or two FC layers of 256 with
  ReLU before the classifier, as Detectron2's box head with NUM_FC 1 or 2).

Every 200 steps: the classifier's accuracy on the validation discs (chance 1/3; a summary of the
image gives 1/2) and, on 40 validation images, the attention from each disc's centre: mass on its
own key, on the other disc's key (uniform: about 0.028), and query dependence (docs/evidence.md).

    python benchmarks/investigate_context_block_alone.py --pairwise disentangled --optimizer adamw
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

STRIDE, IMAGES_PER_STEP, DISC_BOX = 4, 8, 22.0  # p2's stride; the detector's batch; a box, px
ATTENTION_IMAGES = 40  # validation images whose attention is measured, as benchmark_context
# the NL parameters' rates (10 x 0.05, and 0.02 x 0.05); the classifier's with
# --head-optimizer: AdamW as the block's, SGD as the detector's box predictor's
BLOCK_LR = {"sgd": 0.5, "adamw": 1e-3}
HEAD_LR = {"sgd": 0.05, "adamw": 1e-3}


def _head_rule(args: argparse.Namespace) -> tuple[str, float]:
    """The classifier's update rule and rate: the block's unless --head-optimizer names one."""
    if args.head_optimizer is None:
        return args.optimizer, BLOCK_LR[args.optimizer]
    return args.head_optimizer, HEAD_LR[args.head_optimizer]


def _optimizer(params: list, rule: str, lr: float) -> torch.optim.Optimizer:
    if rule == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def pair_features(
    weights: Path, config: Path, train_images: int
) -> dict[str, tuple[torch.Tensor, list]]:
    """``{"train": (p2 (N, C, 48, 48) float16, layouts), "val": ...}`` of ``pair`` through the
    backbone of the context detector ``weights`` (built by ``config``): the first
    ``train_images`` training images and the 100 validation images."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import detection_utils

    from nl_detectron.config import load_config
    from nl_detectron.data.context import ensure_context_split
    from nl_detectron.engine import Trainer
    from nl_detectron.evaluation.attention_stats import split_of

    model = Trainer.build_model(load_config(str(config), ["MODEL.DEVICE", "cpu"])).eval()
    for name in ("fvcore", "detectron2"):  # the pretext's own predictors do not load: expected
        logging.getLogger(name).setLevel(logging.ERROR)
    DetectionCheckpointer(model).load(str(weights))
    out = {}
    for split, count in (("train", train_images), ("val", None)):
        split_dir = ensure_context_split(split_of(f"nl_context_pair_{split}"))
        layouts = json.loads((split_dir / "layout.json").read_text())[:count]
        maps = []
        for index in range(len(layouts)):
            path = split_dir / "images" / f"{index:05d}.png"
            image = detection_utils.read_image(str(path), "BGR")
            with torch.no_grad():
                tensor = torch.as_tensor(image.transpose(2, 0, 1).copy())
                images = model.preprocess_image([{"image": tensor}])
                maps.append(model.backbone(images.tensor)["p2"][0].half())
        out[split] = (torch.stack(maps), layouts)
    return out


def pretext_features(pretext: str, cache_dir: Path) -> dict[str, tuple[torch.Tensor, list]]:
    """:func:`pair_features` of the cached pretext detector (python tools/pretrain_context.py
    --pretext PRETEXT; trained first if it is not there), cached in ``cache_dir``."""
    from benchmark_context import CONFIGS, PRETEXT_OF_SUFFIX
    from pretrain_context import ensure_pretrained

    from nl_detectron.atomic_files import atomic_write

    cache = cache_dir / f"p2_{pretext}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    suffix = next(s for s, p in PRETEXT_OF_SUFFIX.items() if p == pretext)
    out = pair_features(ensure_pretrained(pretext), CONFIGS["baseline" + suffix], 1000)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda f: torch.save(out, f))
    return out


def discs_of(layouts: list[dict]) -> list[tuple[int, float, float, int]]:
    """``(image, x, y, category)`` of every disc."""
    return [(i, *d["center"], d["category"]) for i, lay in enumerate(layouts) for d in lay["discs"]]


class DiscClassifier(nn.Module):
    """A disc's category from the block's output around it (the ``--head`` kinds)."""

    def __init__(self, kind: str, channels: int, num_classes: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "center":
            self.layers = nn.Linear(channels * 9, num_classes)
        elif kind == "roi_linear":
            self.layers = nn.Linear(channels * 49, num_classes)
        else:
            fc = [nn.Linear(channels * 49, 256), nn.ReLU()]
            if kind == "roi_2fc":
                fc += [nn.Linear(256, 256), nn.ReLU()]
            self.layers = nn.Sequential(*fc, nn.Linear(256, num_classes))

    def forward(self, y: torch.Tensor, discs: list[tuple[int, float, float, int]]) -> torch.Tensor:
        from torchvision.ops import roi_align

        if self.kind == "center":
            padded = F.pad(y, (1, 1, 1, 1))
            cells = [(b, int(cy // STRIDE), int(cx // STRIDE)) for b, cx, cy, _ in discs]
            rows = [padded[b, :, r : r + 3, c : c + 3].flatten() for b, r, c in cells]
            return self.layers(torch.stack(rows))
        half = DISC_BOX / 2
        boxes = [[b, cx - half, cy - half, cx + half, cy + half] for b, cx, cy, _ in discs]
        pooled = roi_align(y, torch.tensor(boxes, dtype=y.dtype), 7, 1 / STRIDE, 2, aligned=True)
        return self.layers(pooled.flatten(1))


def train(args: argparse.Namespace, data: dict) -> list[dict]:
    from nl_detectron.evaluation.attention_stats import block_attention_stats
    from nl_detectron.layers import NonLocalBlock

    torch.manual_seed(args.seed)
    train_maps, train_layouts = data["train"]
    val_maps, val_layouts = data["val"]
    block = NonLocalBlock(
        train_maps.shape[1],
        pairwise=args.pairwise,
        init="fan_in",
        gate_init=args.gate_init,
        temperature=args.temperature,
    )
    # categories, and with --background a fourth class: background
    head = DiscClassifier(args.head, train_maps.shape[1], 3 + bool(args.background))
    params = [*block.parameters(), *head.parameters()]
    optimizers = [
        _optimizer(list(block.parameters()), args.optimizer, BLOCK_LR[args.optimizer]),
        _optimizer(list(head.parameters()), *_head_rule(args)),
    ]
    rng = np.random.default_rng(args.seed)
    val_discs = discs_of(val_layouts)
    val_categories = torch.tensor([d[3] for d in val_discs])
    history = []
    for step in range(args.steps + 1):
        if step % 200 == 0 or step == args.steps:
            block.eval(), head.eval()
            with torch.no_grad():
                logits = head(block(val_maps.float()), val_discs)
            accuracy = float((logits[:, :3].argmax(1) == val_categories).float().mean())
            inputs = ((x[None].float(), layout) for x, layout in zip(val_maps, val_layouts))
            stats = block_attention_stats(block, itertools.islice(inputs, ATTENTION_IMAGES))
            own, other = stats.cue_mass, stats.decoy_mass
            dependence = stats.query_dependence
            figures = {"accuracy": accuracy, "own key": own, "other key": other}
            history.append({"step": step, **figures, "query dependence": dependence})
            print(
                f"step {step:5d}: accuracy {accuracy:.2f}, own key {own:.3f}, other key "
                f"{other:.3f}, query dependence {dependence:.2f}",
                flush=True,
            )
            block.train(), head.train()
        if step == args.steps:
            break
        batch = rng.choice(len(train_maps), IMAGES_PER_STEP, replace=False)
        discs = discs_of([train_layouts[i] for i in batch])
        if args.background:
            # K random points per disc, spread over the batch's images, class 3
            points = rng.uniform(12, 180, size=(len(discs) * args.background, 2))
            k = args.background
            discs += [(i // k % len(batch), x, y, 3) for i, (x, y) in enumerate(points)]
        logits = head(block(train_maps[batch].float()), discs)
        loss = F.cross_entropy(logits, torch.tensor([d[3] for d in discs]))
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 2.0)
        for optimizer in optimizers:
            optimizer.step()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from nl_detectron.data.context import PRETEXT_CLASSES

    parser.add_argument("--pretext", default="marks_colours", choices=list(PRETEXT_CLASSES))
    parser.add_argument("--pairwise", default="disentangled")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--gate-init", type=float, default=0.1)
    parser.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    parser.add_argument(
        "--head-optimizer",
        choices=["sgd", "adamw"],
        help="the classifier's rule, else the block's (and its rate): adamw (1e-3) or sgd (the "
        "detector's box predictor's: momentum 0.9, 0.05)",
    )
    heads = ["center", "roi_linear", "roi_1fc", "roi_2fc"]
    parser.add_argument("--head", default="center", choices=heads)
    parser.add_argument(
        "--background",
        type=int,
        default=0,
        help="K: also classify K random background points per disc (class 3), as the "
        "detector's RoI heads classify sampled background boxes (3 per object in Detectron2's "
        "default sampling, POSITIVE_FRACTION 0.25)",
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / "output" / "block_alone")
    parser.add_argument(
        "--weights",
        type=Path,
        help="another context detector without blocks (its run directory) instead of the "
        "pretext's: its config.yaml and model_final.pth; nothing is cached",
    )
    parser.add_argument("--train-images", type=int, default=1000, help="with --weights")
    args = parser.parse_args()
    from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

    ignore_known_third_party_warnings()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.weights is None:
        data = pretext_features(args.pretext, args.cache)
    else:
        run = args.weights
        data = pair_features(run / "model_final.pth", run / "config.yaml", args.train_images)
    train(args, data)


if __name__ == "__main__":
    main()
