"""Detectron2's own tools (the ``tools/`` of its source, not this project's) on the project's
Python configs, as a user runs them: ``lazyconfig_train_net.py`` trains and ends with an
evaluation table, ``analyze_model.py`` counts the NL blocks, ``benchmark.py --task eval`` runs;
the tasks that cannot take a Python config fail in Detectron2 itself, as the README says.

The tools come from ``$DETECTRON2_SOURCE`` (a source tree or ``git archive`` tarball, as for
``make test-main``) or ``../shared/third_party/detectron2-02b5c4e.tar.gz``; without either the
tests are skipped. One short training run is shared: the other tools load its weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from training_runs import REPO, assert_no_traceback, train_net

pytestmark = pytest.mark.slow

SOURCE_TARBALL = REPO.parent / "shared" / "third_party" / "detectron2-02b5c4e.tar.gz"
QUICKSTART = str(REPO / "configs" / "quickstart" / "mask_rcnn_nl_shapes.py")
# The 16-image split, for training and evaluation alike.
ON_MINI = (
    "dataloader.train.dataset_dicts.names=nl_shapes_mini",
    "dataloader.test.dataset.names=nl_shapes_mini",
    "dataloader.evaluator.dataset_name=nl_shapes_mini",
)
# Operators of the NL block: none may be reported unsupported.
BLOCK_OPERATORS = (
    "aten::baddbmm", "aten::bmm", "aten::matmul", "aten::scaled_dot_product_attention",
    "aten::pad", "aten::flip", "aten::sort", "aten::searchsorted", "aten::cumsum", "aten::rsqrt",
    "aten::pow",
    "aten::mean",
)  # fmt: skip


def _source() -> Path | None:
    given = os.environ.get("DETECTRON2_SOURCE")
    for candidate in [Path(given)] if given else [SOURCE_TARBALL]:
        if candidate.exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Detectron2's ``tools/`` directory, extracted once from the source tarball."""
    source = _source()
    if source is None:
        pytest.skip(
            f"no Detectron2 source for its tools/ (set DETECTRON2_SOURCE or add {SOURCE_TARBALL})"
        )
    if source.is_dir():
        return source / "tools"
    root = tmp_path_factory.mktemp("detectron2_source")
    with tarfile.open(source) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tools"]]
        tar.extractall(root, members=members, filter="data")
    (directory,) = root.glob("*/tools")
    return directory


def _run(tool: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return train_net(*args, config=None, script=tool, timeout=timeout)


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def lazy_run(tools: Path, tmp_path_factory: pytest.TempPathFactory):
    """``lazyconfig_train_net.py`` on the quickstart as a user runs it, 3 iterations of 2
    images, evaluated at the end; every box kept (score threshold 0), so that the mask and
    keypoint heads, and the keypoint decoding, run on the barely trained model."""
    output_dir = tmp_path_factory.mktemp("upstream_lazy")
    proc = _run(
        tools / "lazyconfig_train_net.py",
        "--config-file", QUICKSTART,
        "train.max_iter=3", "train.eval_period=0", "train.device=cpu",
        "train.checkpointer.period=1000", f"train.output_dir={output_dir}",
        "dataloader.train.total_batch_size=2", *ON_MINI,
        "model.roi_heads.box_predictor.test_score_thresh=0.0",
    )  # fmt: skip
    return output_dir, proc


def test_lazy_trainer_trains_and_evaluates(lazy_run):
    output_dir, proc = lazy_run
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert_no_traceback(proc)
    out = _output(proc)
    for task in ("bbox", "segm", "keypoints"):
        assert f"copypaste: Task: {task}" in out, task
    assert (output_dir / "model_final.pth").is_file()


def test_analyze_model(tools, lazy_run):
    output_dir, _ = lazy_run
    proc = _run(
        tools / "analyze_model.py",
        "--config-file", QUICKSTART,
        "--tasks", "flop", "activation", "parameter", "structure",
        "--num-inputs", "2",  # its activation average divides by num_inputs - 1
        f"train.init_checkpoint={output_dir / 'model_final.pth'}", "train.device=cpu",
        "dataloader.test.dataset.names=nl_shapes_mini",
    )  # fmt: skip
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert_no_traceback(proc)
    unsupported = set(re.findall(r"Unsupported operator (\S+) encountered", out))
    assert not unsupported & set(BLOCK_OPERATORS), unsupported
    assert "Total GFlops" in out and "Total (Million) Activations" in out
    # The parameter table (depth 5) and the structure list the blocks.
    assert "backbone.bottom_up.res4.non_local_before_5" in out
    assert "(non_local_after_conv_fcn8): NonLocalBlock" in out


def test_benchmark_eval(tools, lazy_run):
    output_dir, _ = lazy_run
    proc = _run(
        tools / "benchmark.py",
        "--task", "eval", "--config-file", QUICKSTART,
        f"train.init_checkpoint={output_dir / 'model_final.pth'}", "train.device=cpu",
        "dataloader.test.dataset.names=nl_shapes_mini",
    )  # fmt: skip
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert re.search(r"300 iters in [\d.]+ seconds", _output(proc))


COCO_NL = str(REPO / "configs" / "mask_rcnn_R_50_FPN_1x_nl.py")


@pytest.mark.parametrize(
    "task, why",
    [
        # benchmark_train builds its model with build_model(cfg): yacs configs only
        ("train", "Missing key MODEL"),
        # detectron2/data/benchmark.py passes np.percentile an argument NumPy 2.4 removed
        ("data", "unexpected keyword argument 'interpolation'"),
    ],
)
def test_benchmark_tasks_that_fail_in_detectron2(tools, task, why):
    """What the README says of these tasks: they stop in Detectron2's own code, for any Python
    config (the model zoo's too), not at the NL blocks. A Detectron2 that fixes one fails this."""
    proc = _run(
        tools / "benchmark.py",
        "--task", task, "--config-file", COCO_NL, "train.device=cpu",
        "dataloader.train.dataset.names=nl_shapes_mini", "dataloader.train.num_workers=0",
        "dataloader.train.total_batch_size=2", "dataloader.train.max_time_seconds=1",
    )  # fmt: skip
    assert proc.returncode != 0 and why in _output(proc), _output(proc)[-3000:]
