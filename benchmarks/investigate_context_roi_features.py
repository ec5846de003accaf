#!/usr/bin/env python
"""What of a trained NL block's output reaches the box classifier, on the context data.

For the ground-truth discs of validation images, the RoI features are computed twice from the
same image, with the model's NL blocks as trained and with them switched to the identity, and the
difference is followed through the box head:

- ``pooled``: |change| / |features| of the RoIAlign output, and the share of the change's energy
  that is constant over each RoI (its per-channel spatial mean): context spread evenly over an
  object is RoI-constant;
- ``first layer``: the same after the box head's first layer (a conv head: before and after its
  norm; an FC head: after fc1);
- ``head``: after the whole box head, and ``class``: the mean total-variation change of the class
  probabilities;
- ``accuracy``: how often the model's top category on a ground-truth disc (of the three) is right,
  and ``absent_mass``: its probability on categories whose colour is nowhere in the image (what
  a summary of the image can rule out; 1/3 or 2/3 at chance, 0 for a model that reads the
  summary).

    python benchmarks/investigate_context_roi_features.py RUN_DIR [RUN_DIR ...] --variant image
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def blocks_as_identity(model):
    """While open, every NL block of ``model`` returns its input."""
    from nl_detectron.layers import non_local_blocks

    handles = [
        block.register_forward_hook(lambda module, args, out: args[0])
        for _, block in non_local_blocks(model)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _relative(delta: torch.Tensor, reference: torch.Tensor) -> float:
    return float(delta.norm() / reference.norm().clamp_min(1e-12))


def _constant_share(delta: torch.Tensor) -> float:
    """Share of ``delta``'s (R, C, H, W) energy in its per-RoI, per-channel spatial mean."""
    mean = delta.mean(dim=(2, 3), keepdim=True).expand_as(delta)
    return float(mean.norm() / delta.norm().clamp_min(1e-12))


def _layouts(split_dir: Path) -> list[dict]:
    return json.loads((split_dir / "layout.json").read_text())


def _present_colors(layout: dict) -> set[int]:
    """Categories whose colour the image shows: the band's, or the key tiles'."""
    if "band" in layout:
        return {layout["band"]["color"]}
    return {key["color"] for key in layout["keys"]}


def measure(run_dir: Path, variant: str, num_images: int) -> dict[str, float]:
    from detectron2.data import DatasetCatalog, detection_utils
    from detectron2.structures import Boxes, BoxMode

    from nl_detectron.checkpoint import NonLocalCheckpointer
    from nl_detectron.config import load_config
    from nl_detectron.data.context import ensure_context_split
    from nl_detectron.engine import Trainer
    from nl_detectron.evaluation.attention_stats import split_of

    split = f"nl_context_{variant}_val"
    cfg = load_config(str(run_dir / "config.yaml"))
    model = Trainer.build_model(cfg).eval()
    NonLocalCheckpointer(model).load(str(run_dir / "model_final.pth"))
    heads = model.roi_heads
    layers = list(heads.box_head.children())  # conv (with norm and ReLU) ..., flatten, fc, ReLU ...
    first_index = next(i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear)))
    first = layers[first_index]
    first_end = first_index + (1 if isinstance(first, nn.Linear) else 0)  # after the fc's ReLU
    split_dir = ensure_context_split(split_of(split))
    layouts = {i + 1: layout for i, layout in enumerate(_layouts(split_dir))}
    sums: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        sums.setdefault(key, []).append(value)

    for record in DatasetCatalog.get(split)[:num_images]:
        image = detection_utils.read_image(record["file_name"], format="BGR")
        inputs = [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy())}]
        boxes = Boxes(torch.tensor([
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]
        ], dtype=torch.float32))  # fmt: skip
        with torch.no_grad():
            images = model.preprocess_image(inputs)
            pooled = {}
            for state, ctx in (
                ("on", contextlib.nullcontext()),
                ("off", blocks_as_identity(model)),
            ):
                with ctx:
                    features = model.backbone(images.tensor)
                pooled[state] = heads.box_pooler(
                    [features[f] for f in heads.box_in_features], [boxes]
                )
            on, off = pooled["on"], pooled["off"]
            add("pooled", _relative(on - off, on))
            add("pooled_constant", _constant_share(on - off))
            if isinstance(first, nn.Conv2d):
                pre_on = F.conv2d(on, first.weight, first.bias, padding=first.padding)
                pre_off = F.conv2d(off, first.weight, first.bias, padding=first.padding)
                add("first_before_norm", _relative(pre_on - pre_off, pre_on))
                add("first_before_norm_constant", _constant_share(pre_on - pre_off))
            head_on, head_off = on, off
            for i, layer in enumerate(layers):
                head_on, head_off = layer(head_on), layer(head_off)
                if i == first_end:
                    add("first_layer", _relative(head_on - head_off, head_on))
            add("head", _relative(head_on - head_off, head_on))
            p_on = heads.box_predictor(head_on)[0].softmax(-1)
            p_off = heads.box_predictor(head_off)[0].softmax(-1)
            add("class", float(0.5 * (p_on - p_off).abs().sum(-1).mean()))
            # The category read on the ground-truth box, among the three; and the mass on the
            # categories whose colour is nowhere in the image (a summary of the image rules
            # them out, only the cue tells the present ones apart).
            scores = p_on[:, :3] / p_on[:, :3].sum(1, keepdim=True)
            truth = torch.tensor([a["category_id"] for a in record["annotations"]])
            add("accuracy", float((scores.argmax(1) == truth).float().mean()))
            present = _present_colors(layouts[record["image_id"]])
            absent = [c for c in range(3) if c not in present]
            add("absent_mass", float(scores[:, absent].sum(1).mean()) if absent else 0.0)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--variant", default="image")
    parser.add_argument("--num-images", type=int, default=40)
    args = parser.parse_args()
    from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

    ignore_known_third_party_warnings()
    keys = ("pooled", "pooled_constant", "first_before_norm", "first_before_norm_constant",
            "first_layer", "head", "class", "accuracy", "absent_mass")  # fmt: skip
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for run_dir in args.run_dirs:
        m = measure(run_dir, args.variant, args.num_images)
        cells = [f"{m[k]:.3f}" if k in m else "-" for k in keys]
        print(f"| {run_dir.name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
