"""tools/compare_runs.py: side-by-side AP of two runs from their metrics.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_runs import REPO

from nl_detectron.evaluation.run_comparison import format_comparison, load_eval_result


def _write_run(directory: Path, evaluations: list[tuple[int, dict[str, float]]]) -> Path:
    """A fabricated OUTPUT_DIR: training lines and evaluation lines, as JSONWriter writes them."""
    directory.mkdir()
    with open(directory / "metrics.json", "w", encoding="utf-8") as f:
        for iteration, metrics in evaluations:
            f.write(json.dumps({"iteration": iteration - 1, "total_loss": 1.0, "lr": 0.02}) + "\n")
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
    return directory


def _coco(box: tuple, mask: tuple, kp: tuple | None = None) -> dict[str, float]:
    metrics = {}
    for task, values in (("bbox", box), ("segm", mask), ("keypoints", kp)):
        if values is None:
            continue
        for name, value in zip(("AP", "AP50", "AP75"), values):
            metrics[f"{task}/{name}"] = value
        metrics[f"{task}/APm"] = 1.0  # not compared
    return metrics


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    # The paper's Table 5 (R50) as the final evaluations; the NL run's best is its last one,
    # the baseline's best is an earlier one.
    baseline = _write_run(
        tmp_path / "baseline",
        [
            (5000, _coco((30.0, 50.0, 32.0), (35.0, 57.0, 37.0))),
            (9000, _coco((38.0, 59.6, 41.0), (34.6, 56.4, 36.5))),
        ],
    )
    nl = _write_run(
        tmp_path / "nl",
        [
            (5000, _coco((31.0, 51.0, 33.0), (30.0, 50.0, 31.0))),
            (9000, _coco((39.0, 61.1, 41.9), (35.5, 58.0, 37.4))),
        ],
    )
    return baseline, nl


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare_runs.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _row(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.strip().startswith(label))
    return line.split(")")[-1].split() if "(iter" in line else line.split()[1:]


@pytest.mark.slow
def test_last_evaluations_side_by_side(runs):
    proc = _compare(str(runs[0]), str(runs[1]), "--which", "last", "--names", "R50", "R50+1NL")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = next(line for line in out.splitlines() if "box AP" in line)
    assert header.split() == ["box", "AP", "AP50", "AP75", "mask", "AP", "AP50", "AP75"]
    assert "kp AP" not in out  # neither run evaluated keypoints
    assert _row(out, "R50 (iter 9000)") == ["38.0", "59.6", "41.0", "34.6", "56.4", "36.5"]
    assert _row(out, "R50+1NL (iter 9000)") == ["39.0", "61.1", "41.9", "35.5", "58.0", "37.4"]
    assert _row(out, "delta") == ["+1.0", "+1.5", "+0.9", "+0.9", "+1.6", "+0.9"]


@pytest.mark.slow
def test_best_evaluation_follows_mask_ap(runs):
    proc = _compare(str(runs[0]), str(runs[1]))  # --which best is the default
    assert proc.returncode == 0, proc.stderr
    # Baseline: best segm/AP is 35.0 at iteration 5000; NL: 35.5 at 9000.
    assert _row(proc.stdout, "baseline (iter 5000)")[:3] == ["30.0", "50.0", "32.0"]
    assert _row(proc.stdout, "delta") == ["+9.0", "+11.1", "+9.9", "+0.5", "+1.0", "+0.4"]


def test_keypoints_and_missing_metrics(tmp_path):
    a = load_eval_result(
        str(_write_run(tmp_path / "a", [(10, _coco((50.0, 70.0, 55.0), None, (60.0, 80.0, 65.0)))]))
    )
    b = load_eval_result(
        str(_write_run(tmp_path / "b", [(10, _coco((52.5, 71.0, 54.0), None, (62.25, 80, 70)))]))
    )
    assert a.metrics["keypoints/AP"] == 60.0  # best by keypoints/AP when there is no segm/AP
    table = format_comparison(a, b)
    assert "mask AP" not in table and "kp AP" in table
    assert _row(table, "delta") == ["+2.5", "+1.0", "-1.0", "+2.2", "+0.0", "+5.0"]

    c = load_eval_result(str(_write_run(tmp_path / "c", [(10, {"bbox/AP": 40.0})])))
    table = format_comparison(a, c)
    assert _row(table, "delta") == ["-10.0", "-", "-", "-", "-", "-"]


def test_multi_dataset_keys(tmp_path):
    run = _write_run(tmp_path / "r", [(10, {"val_a/bbox/AP": 40.0, "val_b/bbox/AP": 20.0})])
    assert load_eval_result(str(run), dataset="val_b").metrics == {"bbox/AP": 20.0}


@pytest.mark.slow
def test_missing_and_unevaluated_runs_are_clean_errors(tmp_path, runs):
    proc = _compare(str(tmp_path / "nowhere"), str(runs[1]))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "No metrics.json" in proc.stderr and "nowhere" in proc.stderr

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 3.0}) + "\n")
    proc = _compare(str(untrained), str(runs[1]))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "holds no evaluation results" in proc.stderr
