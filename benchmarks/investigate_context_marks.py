#!/usr/bin/env python
"""Can a trained model's NL block match a disc to its key on the ``pair`` context data? Its
theta and phi are linear maps of the block's input, so matching needs the disc's mark and the
key's mark to be linearly readable there, in a code shared by both.

For the validation images, the NL block's input is taken at each disc's centre and each key
tile's centre, and a linear softmax probe for the mark (3 classes, chance 1/3) is fitted:

- ``discs`` / ``keys``: fitted on one half of the discs (keys), accuracy on the other half;
- ``discs -> keys``: fitted on all discs, accuracy on all keys (a code shared by both);
- ``key colour``: the key's colour (its disc's category) at the key's centre, fitted on one half
  of the keys: what the block's values must carry from the matched key.

    python benchmarks/investigate_context_marks.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBE_STEPS, PROBE_LR, PROBE_DECAY = 500, 0.1, 1e-3


def block_inputs_at_marks(run_dir: Path, num_images: int) -> dict[str, tuple[np.ndarray, ...]]:
    """``{"discs": (features, marks), "keys": (features, marks), "key colour": (features,
    colours)}``: the first NL block's input at each disc's and each key's centre cell."""
    from detectron2.data import detection_utils

    from nl_detectron.checkpoint import NonLocalCheckpointer
    from nl_detectron.config import load_config
    from nl_detectron.data.context import IMAGE_SIZE, ensure_context_split
    from nl_detectron.engine import Trainer
    from nl_detectron.evaluation.attention_stats import split_of
    from nl_detectron.layers import recorded_block_inputs

    model = Trainer.build_model(load_config(str(run_dir / "config.yaml"))).eval()
    NonLocalCheckpointer(model).load(str(run_dir / "model_final.pth"))
    split_dir = ensure_context_split(split_of("nl_context_pair_val"))
    layouts = json.loads((split_dir / "layout.json").read_text())[:num_images]
    found: dict[str, tuple[list, list]] = {"discs": ([], []), "keys": ([], [])}
    for index, layout in enumerate(layouts):
        image = detection_utils.read_image(str(split_dir / "images" / f"{index:05d}.png"), "BGR")
        tensor = torch.as_tensor(image.transpose(2, 0, 1).copy())
        with torch.no_grad(), recorded_block_inputs(model) as calls:
            model([{"image": tensor, "height": IMAGE_SIZE, "width": IMAGE_SIZE}])
        x = calls[0][2][0]  # (C, H, W), the first block's input
        stride = IMAGE_SIZE / x.shape[-1]
        for kind in ("discs", "keys"):
            for item in layout[kind]:
                cx, cy = item["center"]
                found[kind][0].append(x[:, int(cy // stride), int(cx // stride)].numpy())
                found[kind][1].append(item["mark"])
    data = {kind: (np.stack(f), np.array(m)) for kind, (f, m) in found.items()}
    colours = [key["color"] for layout in layouts for key in layout["keys"]]
    data["key colour"] = (data["keys"][0], np.array(colours))
    return data


def fit_probe(features: np.ndarray, labels: np.ndarray):
    """A linear softmax classifier on standardised features (full-batch gradient descent);
    returns its predict function."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / std
    weight, bias = np.zeros((z.shape[1], 3)), np.zeros(3)
    for _ in range(PROBE_STEPS):
        logits = z @ weight + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(labels)), labels] -= 1
        weight -= PROBE_LR * (z.T @ p / len(labels) + PROBE_DECAY * weight)
        bias -= PROBE_LR * p.mean(0)
    return lambda x: (((x - mean) / std) @ weight + bias).argmax(1)


def probe(run_dir: Path, num_images: int) -> dict[str, float]:
    data = block_inputs_at_marks(run_dir, num_images)
    out = {}
    for kind, (x, y) in data.items():
        half = len(y) // 2
        out[kind] = float((fit_probe(x[:half], y[:half])(x[half:]) == y[half:]).mean())
    (xd, yd), (xk, yk) = data["discs"], data["keys"]
    out["discs -> keys"] = float((fit_probe(xd, yd)(xk) == yk).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--num-images", type=int, default=100)
    args = parser.parse_args()
    from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

    ignore_known_third_party_warnings()
    keys = ("discs", "keys", "discs -> keys", "key colour")
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for run_dir in args.run_dirs:
        m = probe(run_dir, args.num_images)
        print(f"| {run_dir.name} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
