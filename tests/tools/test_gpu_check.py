"""The GPU check and the wheels it travels with: its dry run (the same code on the CPU, tiny
sizes) ends with every part measured and both reports written, so the script cannot rot on
machines without a GPU."""

import json
import subprocess
import sys

import pytest
from training_runs import REPO, run_env

sys.path.insert(0, str(REPO / "tools"))

import gpu_wheels  # noqa: E402


@pytest.mark.slow
def test_dry_run_measures_every_part(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gpu_check.py"),
            "--dry-run",
            "--output",
            str(tmp_path),
        ],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    errors = {name: part["error"] for name, part in report["parts"].items() if "error" in part}
    assert proc.returncode == 0 and not errors, errors or proc.stderr[-3000:]
    assert list(report["parts"]) == ["tests", "training", "block", "detector", "roi_counts"]
    parts = {name: part["result"] for name, part in report["parts"].items()}
    assert parts["tests"]["passed"] and "passed" in parts["tests"]["summary"]
    assert parts["tests"]["attention_kernels"]  # the kernel of each shape, printed
    training = parts["training"]
    assert training["float32"]["returncode"] == 0 and training["bfloat16"]["returncode"] == 0
    assert set(training["bfloat16"]["AP"]) == {"bbox", "segm", "keypoints"}
    assert {"res3/float32/ours", "res3/bfloat16/naive"} <= set(parts["block"])
    assert parts["detector"]["train_step"]["nl_s"] > 0
    assert parts["roi_counts"]["bfloat16"]["attention_kernels"] == ["FLASH_ATTENTION"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in markdown and "| target | measured | met |" in markdown


def test_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr


@pytest.mark.parametrize(
    "wheel, fits",
    [
        ("fvcore-0.1.5.post20221221-py3-none-any.whl", True),
        ("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
        ("pycocotools-2.0.11-cp311-cp311-manylinux_2_17_x86_64.whl", False),
        ("faster_coco_eval-1.8.0-cp312-cp312-manylinux_2_28_aarch64.whl", False),
        ("onlypy2-1.0-py2-none-any.whl", False),
    ],
)
def test_wheel_tags_for_the_gpu_python(wheel, fits):
    assert gpu_wheels._fits(wheel, "3.12") == fits


def test_versions_come_from_the_pinned_stack():
    pins = gpu_wheels.pinned_versions()
    for name in (*gpu_wheels.BINARY, *gpu_wheels.PURE):
        assert name in pins, name
