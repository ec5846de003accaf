"""Smoke runs of the benchmark scripts' ``--quick`` modes (and of the profile investigation at
the quick size): they run and print their tables.

No timing is asserted: the figures of a quick run mean nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from training_runs import REPO

BENCHMARKS = REPO / "benchmarks"


def run_script(name: str, *args: str, quick: bool = True) -> str:
    """Run ``benchmarks/<name> [--quick] <args>``; return its standard output."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *(["--quick"] if quick else []), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def table_rows(output: str, first_cells: str) -> list[str]:
    """The markdown table rows of ``output`` that start with ``| <first_cells> |``."""
    return [line for line in output.splitlines() if line.startswith(f"| {first_cells} |")]


@pytest.mark.slow
def test_end_to_end_quick() -> None:
    out = run_script("benchmark_end_to_end.py", "--models", "mask_rcnn")
    for heading in ("Training step", "Inference per image", "Peak memory", "Parameters"):
        assert f"## {heading}" in out
    rows = table_rows(out, "mask_rcnn | quick")
    assert len(rows) == 4, out  # one per table
    inference = next(r for r in rows if "(yes)" in r or "(NO)" in r)
    assert "(yes)" in inference, "baseline and NL models should give the same detections"
    params = rows[-1].split("|")
    assert float(params[4]) > float(params[3])  # the NL model has more parameters


@pytest.mark.slow
def test_coco_eval_quick() -> None:
    out = run_script("benchmark_coco_eval.py")
    for task in ("bbox", "segm", "keypoints"):
        assert len(re.findall(rf"^{task} +\S+ stats: \[", out, re.M)) == 2, out
        (row,) = table_rows(out, task)
        assert float(row.split("|")[-2]) <= 1e-4  # max abs diff of the stats
    assert table_rows(out, "total")


@pytest.mark.slow
def test_block_scaling_quick(tmp_path: Path) -> None:
    image = tmp_path / "block_scaling.png"
    out = run_script("plot_block_scaling.py", "--output", str(image))
    for pairwise in ("embedded_gaussian", "dot_product"):
        assert len(table_rows(out, pairwise)) == 3, out
    assert image.stat().st_size > 0


@pytest.mark.slow
def test_profile_investigation_quick_size() -> None:
    args = ("--models", "mask_rcnn", "--sizes", "quick", "--repeats", "1")
    out = run_script("investigate_non_local_profile.py", *args, quick=False)
    for heading in ("Profile, train_step", "Profile, inference", "Fused attention"):
        assert f"### {heading}" in out, out
    assert len(table_rows(out, "forward")) == 1, out
    (flops,) = table_rows(out, "mask_rcnn | quick")
    cells = flops.split("|")
    assert float(cells[4]) > float(cells[3]) > 0  # the NL model does more arithmetic


@pytest.mark.slow
def test_context_quick(tmp_path: Path) -> None:
    out = run_script("benchmark_context.py", "--variants", "pair", "--seeds", "0",
                     "--models", "baseline", "nl", "--output", str(tmp_path))  # fmt: skip
    for model in ("baseline", "nl"):
        assert re.search(rf"^pair +{model} +seed 0: box AP [\d.]+, mask AP [\d.]+", out, re.M), out
    rows = table_rows(out, "pair")
    assert [r.split("|")[2].strip() for r in rows] == ["baseline", "nl"], rows
    assert all(len(r.split("|")) == 11 for r in rows), rows  # variant, model, AP, gain, 5 stats
    assert all((tmp_path / "nl" / f"attention_pair_{k}.png").stat().st_size > 0 for k in range(3))
    results = json.loads((tmp_path / "results.json").read_text())
    (stats,) = results["variants"]["pair"]["nl"]["attention"]
    assert 0 < stats["uniform_mass"] < 0.5  # the key tile's share of the map
    # The cue is beyond what the (trained) baseline's category scores read.
    reach = re.search(r"^pair: the baseline's category scores read (\d+) px from a disc, its cue "
                      r"is 96 px away: 0 cue pixels reached$", out, re.M)  # fmt: skip
    assert reach and 0 < int(reach.group(1)) < 96, out
    for key in ("cue_mass", "decoy_mass", "entropy", "query_dependence"):
        assert 0 <= stats[key] <= 1 + 1e-6, stats  # NaN fails too
    # The investigations run on the runs the benchmark trained.
    nl_run = str(tmp_path / "pair" / "nl_seed0")
    out = run_script("investigate_context_marks.py", nl_run, "--num-images", "10", quick=False)
    (row,) = table_rows(out, "nl_seed0")
    accuracies = [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
    assert len(accuracies) == 4 and all(0 <= a <= 1 for a in accuracies), row
    # The block alone on the trained baseline's features (the pretext detector's by default).
    out = run_script("investigate_context_block_alone.py", "--weights",
                     str(tmp_path / "pair" / "baseline_seed0"), "--train-images", "16",
                     "--steps", "3", quick=False)  # fmt: skip
    last = out.strip().splitlines()[-1]
    figures = re.fullmatch(r"step +3: accuracy ([\d.]+), own key ([\d.]+), other key ([\d.]+), "
                           r"query dependence ([\d.]+)", last)  # fmt: skip
    assert figures and all(0 <= float(f) <= 1 + 1e-6 for f in figures.groups()), out
    out = run_script("investigate_context_roi_features.py", nl_run, "--variant", "pair",
                     "--num-images", "5", quick=False)  # fmt: skip
    (row,) = table_rows(out, "nl_seed0")
    accuracy = float(row.strip("| ").split(" | ")[8])
    assert 0 <= accuracy <= 1, row
