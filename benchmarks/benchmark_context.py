#!/usr/bin/env python
"""Evidence that the non-local block uses context far away: the context configs trained
identically, without a block (baseline), with GCNet's query-independent block (gc), the
non-local block (nl) and the disentangled one (dnl), on every variant of the bundled context
data (nl_detectron.data.context), with a table of the final box / mask AP, the gains over the
baseline, the attention statistics of the block models (mass on the cue and on the decoy,
entropy, query dependence) and attention maps.

    python benchmarks/benchmark_context.py                        # 4 variants x 2 seeds x 4 models
    python benchmarks/benchmark_context.py --variants pair --seeds 0 --models baseline nl
    python benchmarks/benchmark_context.py --quick                 # a smoke run (minutes)

Runs go to ``OUTPUT/<variant>/<model>_seed<k>``; a finished run (``model_final.pth`` and an
evaluation in ``metrics.json``) is reused, so the script can be resumed. Results:
``OUTPUT/results.json`` (variants of earlier calls into OUTPUT kept) and
``OUTPUT/<model>/attention_<variant>_<k>.png`` (the first validation images).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

sys.path.insert(0, str(REPO / "tools"))

from common import cpu_name, git_revision, load_average  # noqa: E402
from pretrain_context import ensure_pretrained  # noqa: E402

VARIANTS = ("image", "pair", "image_local", "pair_local")
# The models compared: no block, GCNet's query-independent control, the non-local block, DNL;
# each from scratch and fine-tuned from a pretext's detector (tools/pretrain_context.py), and in
# the box-branch recipe (the block read by the box branch only; docs/evidence.md): the model
# name's suffix says which.
PRETEXT_OF_SUFFIX = {
    "": None,
    "_pretext": "marks",
    "_pretext_colours": "marks_colours",
    "_box_branch": "marks_colours",
}
CONFIGS = {
    f"{model}{suffix}": REPO / "configs" / "context" / f"mask_rcnn_{model}_context{suffix}.yaml"
    for suffix in PRETEXT_OF_SUFFIX
    for model in ("baseline", "gc", "nl", "dnl")
}
DEFAULT_MODELS = ("baseline", "gc", "nl", "dnl")
# the models with a block, whose attention is measured
BLOCK_MODELS = tuple(m for m in CONFIGS if not m.startswith("baseline"))


def _suffix(model: str) -> str:
    return next(s for s in sorted(PRETEXT_OF_SUFFIX, key=len, reverse=True) if model.endswith(s))


def baseline_of(model: str) -> str:
    """The model without a block that ``model`` is compared with (same initialisation)."""
    return "baseline" + _suffix(model)


ATTENTION_IMAGES = 3  # validation images drawn with the NL model's attention, per variant
REACH_IMAGES = 20  # validation images on which the baseline's receptive field is measured
# What each distant-cue variant is compared with: the same geometry, the cue on the object.
LOCAL_CONTROL = {"image": "image_local", "pair": "pair_local"}


def run_dir(output: Path, variant: str, model: str, seed: int) -> Path:
    return output / variant / f"{model}_seed{seed}"


def final_ap(directory: Path) -> dict[str, float] | None:
    """The last evaluation's bbox and segm AP of a finished run, else None."""
    if not (directory / "model_final.pth").is_file() or not (directory / "metrics.json").is_file():
        return None
    evaluations = [
        record
        for record in map(json.loads, (directory / "metrics.json").read_text().splitlines())
        if "bbox/AP" in record
    ]
    if not evaluations:
        return None
    return {"bbox": evaluations[-1]["bbox/AP"], "segm": evaluations[-1].get("segm/AP")}


def train(directory: Path, config: Path, variant: str, seed: int, extra: list[str]) -> float:
    """Train one run (unless finished); returns the seconds it took (0 if reused)."""
    if final_ap(directory) is not None:
        return 0.0
    command = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config),
        "DATASETS.TRAIN", f"('nl_context_{variant}_train',)",
        "DATASETS.TEST", f"('nl_context_{variant}_val',)",
        "SEED", str(seed), "OUTPUT_DIR", str(directory), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {directory} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def attention(directory: Path, variant: str, num_images: int) -> list[dict]:
    from nl_detectron.checkpoint import NonLocalCheckpointer
    from nl_detectron.config import load_config
    from nl_detectron.engine import Trainer
    from nl_detectron.evaluation.attention_stats import context_attention_stats, split_of

    cfg = load_config(str(directory / "config.yaml"))
    model = Trainer.build_model(cfg)
    NonLocalCheckpointer(model).load(str(directory / "model_final.pth"))
    split = split_of(f"nl_context_{variant}_val")
    return [s.as_dict() for s in context_attention_stats(model, split, num_images=num_images)]


def baseline_reach(directory: Path, variant: str, num_images: int) -> dict[str, float]:
    """How far (Chebyshev, px) the trained baseline's category scores read from each disc of the
    first validation images, for a box of twice the disc's size, and how many cue pixels they
    read (0: the cue is beyond the baseline's receptive field)."""
    import torch
    from detectron2.data import detection_utils

    from nl_detectron.checkpoint import NonLocalCheckpointer
    from nl_detectron.config import load_config
    from nl_detectron.data.context import MIN_CUE_DISTANCE, cue_mask, ensure_context_split
    from nl_detectron.engine import Trainer
    from nl_detectron.evaluation.attention_stats import split_of
    from nl_detectron.evaluation.receptive_field import (
        chebyshev_reach,
        pixels_reaching_scores,
        square_boxes,
    )

    cfg = load_config(str(directory / "config.yaml"))
    model = Trainer.build_model(cfg)
    NonLocalCheckpointer(model).load(str(directory / "model_final.pth"))
    split_dir = ensure_context_split(split_of(f"nl_context_{variant}_val"))
    layouts = json.loads((split_dir / "layout.json").read_text())[:num_images]
    reach, reached = 0.0, 0
    for index, layout in enumerate(layouts):
        bgr = detection_utils.read_image(str(split_dir / "images" / f"{index:05d}.png"), "BGR")
        image = torch.as_tensor(bgr.transpose(2, 0, 1).copy()).float()
        discs = layout["discs"]
        boxes = square_boxes([d["center"] for d in discs], [2 * d["radius"] for d in discs])
        masks = pixels_reaching_scores(model, image, boxes)
        cue = torch.from_numpy(cue_mask(layout))
        reached += int((masks & cue).sum())
        reach = max([reach] + [chebyshev_reach(m, d["center"]) for m, d in zip(masks, discs)])
    return {"reach": reach, "cue_pixels_reached": reached, "cue_distance": MIN_CUE_DISTANCE}


def draw(directory: Path, variant: str, output: Path, num_images: int) -> None:
    """Attention maps of the NL model's blocks on the first ``num_images`` validation images,
    one query per object (disc centre): ``output/attention_<variant>_<k>.png``."""
    from nl_detectron.data.context import ensure_context_split
    from nl_detectron.evaluation.attention_stats import split_of
    from nl_detectron.visualization import (
        Predictor,
        compute_attention_maps,
        draw_attention_maps,
        inference_config,
        read_rgb_image,
    )

    split_dir = ensure_context_split(split_of(f"nl_context_{variant}_val"))
    layouts = json.loads((split_dir / "layout.json").read_text())
    cfg = inference_config(
        str(directory / "config.yaml"), weights=str(directory / "model_final.pth")
    )
    predictor = Predictor(cfg, source=str(directory))
    for index in range(num_images):
        image = read_rgb_image(str(split_dir / "images" / f"{index:05d}.png"))
        points = [tuple(d["center"]) for d in layouts[index]["discs"]]
        result = compute_attention_maps(predictor, image, points)
        draw_attention_maps(result, output / f"attention_{variant}_{index}.png", panel_size=256)


def _cell(value: float | None) -> str:
    """A statistic to 3 decimals; "-" where it does not apply (missing or NaN)."""
    return "-" if value is None or value != value else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else sum(values) / len(values)


def _ap(value: float | None) -> str:
    """An AP to 1 decimal; "-" for a run without it (MODEL.MASK_ON False has no mask AP)."""
    return "-" if value is None else f"{value:.1f}"


def _aps(entry: dict) -> str:
    """Mean box / mask AP, and the box AP of each seed when there are several."""
    text = f"{_ap(entry['bbox'])} / {_ap(entry['segm'])}"
    if len(entry["per_seed"]) > 1:
        text += " (box " + ", ".join(f"{a['bbox']:.1f}" for a in entry["per_seed"]) + ")"
    return text


def table(results: dict) -> str:
    """One row per variant and model: AP, the gain over the baseline, the attention of the
    model's first block (the first seed's run)."""
    lines = [
        "| variant | model | box / mask AP | - its baseline (box) | cue mass (uniform) | "
        "decoy mass | entropy | query dependence | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, entry in results["variants"].items():
        for model in CONFIGS:
            if model not in entry:
                continue
            run, base = entry[model], entry.get(baseline_of(model))
            gain = f"{run['bbox'] - base['bbox']:+.1f}" if base and model in BLOCK_MODELS else "-"
            # one row per attention measured: DNL's also by its pairwise term alone
            for k, s in enumerate(run.get("attention") or [{}]):
                uniform = f" ({_cell(s.get('uniform_mass'))})" if s else ""
                label = model + (
                    " (pairwise term)" if s.get("block", "").endswith(":pairwise") else ""
                )
                aps, delta = (_aps(run), gain) if k == 0 else ("", "")
                lines.append(
                    f"| {variant} | {label} | {aps} | {delta} | {_cell(s.get('cue_mass'))}"
                    f"{uniform} | {_cell(s.get('decoy_mass'))} | {_cell(s.get('entropy'))} | "
                    f"{_cell(s.get('query_dependence'))} | {_cell(s.get('gate'))} |"
                )
    return "\n".join(lines)


def _relation_stats(attention: list[dict]) -> dict:
    """The attention that should show a relation: DNL's pairwise term, else the block's."""
    pairwise = [s for s in attention if s["block"].endswith(":pairwise")]
    return (pairwise or attention or [{}])[0]


def targets(results: dict) -> list[str]:
    """The targets, measured: each block model closes half the gap to the local control on the
    distant-cue variants (and on ``pair`` does it with a relation: cue mass at least 3x the decoy
    mass, query dependence at least 0.3), and loses at most 1 AP on the local controls."""
    v = results["variants"]
    out = []
    for distant, local in LOCAL_CONTROL.items():
        if distant in v and local not in v:
            out.append(f"{distant}: target not measured: {local} (its local control) not run")
        if distant not in v or local not in v:
            continue
        for model in BLOCK_MODELS:
            reference = baseline_of(model)
            if model not in v[distant] or reference not in v[distant] or reference not in v[local]:
                continue
            base, ctl = v[distant][reference]["bbox"], v[local][reference]["bbox"]
            half = 0.5 * (ctl - base)
            gain = v[distant][model]["bbox"] - base
            line = (
                f"{distant}: {model} - {reference} {gain:+.1f} vs half the gap to {local} "
                f"{half:.1f}: {'met' if gain >= half else 'NOT met'}"
            )
            stats = _relation_stats(v[distant][model].get("attention") or [])
            if distant == "pair" and stats:
                ratio = stats["cue_mass"] / max(stats["decoy_mass"], 1e-9)
                relation = ratio >= 3 and stats["query_dependence"] >= 0.3
                line += (
                    f"; cue / decoy mass {ratio:.2f}, query dependence "
                    f"{stats['query_dependence']:.2f} (>= 3, >= 0.3): "
                    f"{'met' if relation else 'NOT met'}"
                )
            out.append(line)
    for variant, entry in v.items():
        if "baseline_reach" in entry:
            r = entry["baseline_reach"]
            out.append(
                f"{variant}: the baseline's category scores read {r['reach']:.0f} px from a disc, "
                f"its cue is {r['cue_distance']:.0f} px away: {r['cue_pixels_reached']} cue pixels "
                "reached"
            )
    for local in LOCAL_CONTROL.values():
        for model in BLOCK_MODELS:
            reference = baseline_of(model)
            if local in v and model in v[local] and reference in v[local]:
                delta = v[local][model]["bbox"] - v[local][reference]["bbox"]
                out.append(f"{local}: {model} - {reference} {delta:+.1f} (target >= -1): "
                           f"{'met' if delta >= -1 else 'NOT met'}")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(CONFIGS))
    parser.add_argument("--output", default="output/evidence", type=Path)
    parser.add_argument("--attention-images", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="20 iterations: a smoke run")
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the table of OUTPUT/results.json, train nothing",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, both models")
    args = parser.parse_args()
    from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

    ignore_known_third_party_warnings()
    extra = list(args.opts)
    if args.quick:
        extra += ["SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(15, 18)", "SOLVER.WARMUP_ITERS", "5"]
        extra += ["TEST.PRECISE_BN.NUM_ITER", "2"]
        args.attention_images = min(args.attention_images, 4)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(
        f"# Context benchmark: {cpu_name()}, load {load_average()}, revision {git_revision()}",
        flush=True,
    )
    # Variants measured by an earlier call into the same output are kept beside these (the
    # local controls can be run with other seeds than the distant-cue variants).
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"variants": {}}
    if args.report:
        print(table(results))
        print("\n".join(targets(results)))
        return
    results["revision"] = git_revision()
    for variant in args.variants:
        # models of an earlier call into the same output are kept beside these
        entry: dict = results["variants"].get(variant, {})
        for model in args.models:
            pretext = PRETEXT_OF_SUFFIX[_suffix(model)]
            if pretext:
                ensure_pretrained(pretext)
            aps = []
            for seed in args.seeds:
                directory = run_dir(args.output, variant, model, seed)
                seconds = train(directory, CONFIGS[model], variant, seed, extra)
                ap = final_ap(directory)
                print(f"{variant:12s} {model:8s} seed {seed}: box AP {_ap(ap['bbox'])}, mask AP "
                      f"{_ap(ap['segm'])} ({seconds / 60:.1f} min)", flush=True)  # fmt: skip
                aps.append(ap)
            entry[model] = {k: _mean([a[k] for a in aps]) for k in ("bbox", "segm")}
            entry[model]["per_seed"] = aps
            first = run_dir(args.output, variant, model, args.seeds[0])
            if model in BLOCK_MODELS:
                entry[model]["attention"] = attention(first, variant, args.attention_images)
                if variant in LOCAL_CONTROL:
                    draw(first, variant, args.output / model, ATTENTION_IMAGES)
            elif model == "baseline":
                entry["baseline_reach"] = baseline_reach(first, variant, REACH_IMAGES)
        results["variants"][variant] = entry
        results_path.write_text(json.dumps(results, indent=2))
    print(table(results))
    for line in targets(results):
        print(line)


if __name__ == "__main__":
    main()
