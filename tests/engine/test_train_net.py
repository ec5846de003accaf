"""tools/train_net.py end to end on the bundled data: train with periodic evaluation, evaluate a
checkpoint, resume; and the clean errors for a missing COCO, offline weights and bad configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from training_runs import REPO, train_net

from nl_detectron.evaluation.coco_backend import get_coco_backend

CONFIG = REPO / "configs" / "quickstart" / "mask_rcnn_nl_shapes.yaml"
# A few iterations of 2 images on the 16-image split, evaluated on it at iterations 2 and 4.
TINY = [
    "DATASETS.TRAIN", "('nl_shapes_mini',)",
    "DATASETS.TEST", "('nl_shapes_mini',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.STEPS", "(3,)",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "TEST.EVAL_PERIOD", "2",
    "TEST.PRECISE_BN.NUM_ITER", "3",
    "DATALOADER.NUM_WORKERS", "0",
    # every proposal becomes a detection: each evaluation has boxes, masks and keypoints to
    # score, whatever 4 iterations from scratch leave of the class scores
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip
TASKS = ("bbox", "segm", "keypoints")

pytestmark = pytest.mark.slow


def _train_net(args: list[str], env: dict[str, str], timeout: int = 400):
    return train_net(*args, config=None, env=env, timeout=timeout)


def _metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.json", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env["NL_DETECTRON_DATA"] = str(tmp_path_factory.mktemp("data"))
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("run")
    proc = _train_net(["--config-file", str(CONFIG), *TINY, "OUTPUT_DIR", str(output_dir)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output_dir, proc


def test_training_writes_metrics_checkpoints_and_events(trained):
    output_dir, proc = trained
    evaluations = [r for r in _metrics(output_dir) if "segm/AP" in r]
    assert [r["iteration"] for r in evaluations] == [1, 4]  # EVAL_PERIOD, then the end
    for record in evaluations:
        for task in TASKS:
            for metric in ("AP", "AP50", "AP75"):
                assert f"{task}/{metric}" in record
    assert any("total_loss" in r for r in _metrics(output_dir))

    # --resume continues from the latest checkpoint, not from model_best.pth.
    assert (output_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (output_dir / "model_final.pth").is_file()
    assert (output_dir / "model_0000001.pth").is_file()  # CHECKPOINT_PERIOD
    assert (output_dir / "model_best.pth").is_file()  # BestCheckpointer on segm/AP
    (events,) = output_dir.glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"total_loss", "lr", "bbox/AP", "segm/AP", "keypoints/AP"} <= set(scalars)
    assert (output_dir / "inference" / "nl_shapes_mini" / "coco_instances_results.json").is_file()

    log = (output_dir / "log.txt").read_text()
    assert "eta:" in log  # CommonMetricPrinter
    assert "Total inference time" in log  # inference_on_dataset
    assert "COCO API" in log and get_coco_backend().name in log  # the fastest one installed
    assert "Saved first model at" in log  # BestCheckpointer
    assert "NonLocal" in log or "non_local" in log  # the NL model was built


def test_eval_only_reproduces_the_final_evaluation(trained, env, tmp_path):
    output_dir, _ = trained
    final = [r for r in _metrics(output_dir) if "segm/AP" in r][-1]
    proc = _train_net(
        [
            "--config-file", str(CONFIG), "--eval-only", *TINY,
            "MODEL.WEIGHTS", str(output_dir / "model_final.pth"),
            "OUTPUT_DIR", str(tmp_path),
        ],
        env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "copypaste: Task: segm" in log
    # copypaste lines: "Task: <task>", metric names, values (4 decimals).
    lines = [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]
    for task in TASKS:
        i = lines.index(f"Task: {task}")
        names, values = lines[i + 1].split(","), lines[i + 2].split(",")
        for name, value in zip(names, values):
            if value != "nan":
                assert float(value) == pytest.approx(final[f"{task}/{name}"], abs=1e-3)


def test_resume_continues_from_the_last_iteration(trained, env, tmp_path):
    output_dir, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_final.pth", "last_checkpoint"):
        (resumed / name).write_bytes((output_dir / name).read_bytes())
    args = [*TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(resumed)]
    proc = _train_net(["--config-file", str(CONFIG), "--resume", *args], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (resumed / "log.txt").read_text()
    assert "Starting training from iteration 4" in log
    iterations = [r["iteration"] for r in _metrics(resumed)]
    assert min(iterations) >= 4 and max(iterations) == 6


def _assert_clean_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for text in expected:
        assert text in proc.stderr, proc.stderr


def test_missing_coco_stops_before_training(env, tmp_path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    coco_env = dict(env, DETECTRON2_DATASETS=str(datasets))
    proc = _train_net(
        [
            "--config-file", str(CONFIG),
            "DATASETS.TRAIN", "('coco_2017_train',)",
            "DATASETS.TEST", "('coco_2017_val',)",
            "OUTPUT_DIR", str(tmp_path / "out"),
        ],
        coco_env,
        timeout=120,
    )  # fmt: skip
    _assert_clean_error(
        proc,
        str(datasets / "coco" / "annotations" / "instances_train2017.json"),
        str(datasets / "coco" / "train2017"),
        str(datasets / "coco" / "annotations" / "instances_val2017.json"),
        f"DETECTRON2_DATASETS={datasets}",
        "https://cocodataset.org",
    )
    assert not (tmp_path / "out").exists()  # stopped before setting anything up


def test_unreachable_weights_stop_before_training(env, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    # FVCORE_CACHE: nothing cached. A dead proxy: the download fails even with network access.
    offline = dict(env, FVCORE_CACHE=str(cache), https_proxy="http://127.0.0.1:9")
    offline["HTTPS_PROXY"] = offline["https_proxy"]
    weights = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    proc = _train_net(
        ["--config-file", str(CONFIG), "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "o")],
        offline,
        timeout=120,
    )
    _assert_clean_error(
        proc,
        weights,
        "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl",
        str(cache / "detectron2" / "ImageNetPretrained" / "MSRA" / "R-50.pkl"),
        "MODEL.WEIGHTS /local/path/R-50.pkl",
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config-file", "configs/quickstart/nope.yaml"], "nope.yaml' not found"),
        (["--config-file", str(CONFIG), "MODEL.NONLOCAL.BACKBONE_POSITION", "[]"], "Non-existent"),
    ],
)
def test_config_errors_are_reported_without_traceback(env, tmp_path, args, expected):
    proc = _train_net([*args, "OUTPUT_DIR", str(tmp_path)], env, timeout=120)
    _assert_clean_error(proc, expected)


@pytest.mark.parametrize(
    "opts, kwargs, expected",
    [
        (["SOLVER.MAX_ITER"], {}, "KEY VALUE pairs"),
        (["SOLVER.MAX_ITER", "many"], {}, "Type mismatch"),
        ([], {"eval_only": True}, "--eval-only needs trained weights"),
        (["MODEL.WEIGHTS", "nowhere/model.pth"], {}, "nowhere/model.pth' does not exist"),
        (["DATASETS.TEST", "('nl_shapes_vall',)"], {}, "Did you mean 'nl_shapes_val'"),
        (["TEST.KEYPOINT_OKS_SIGMAS", "[0.05]"], {}, "one sigma per keypoint"),
        (["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "17"], {}, "has 4 keypoints"),
        (["MODEL.DEVICE", "cuda"], {"num_gpus": 64}, "--num-gpus 64"),
        (["SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(6, 6)"], {}, "SOLVER.STEPS is (6, 6)"),
    ],
)
def test_user_errors_name_the_value_and_the_fix(opts, kwargs, expected):
    from nl_detectron.config import load_config
    from nl_detectron.errors import UserInputError
    from nl_detectron.preflight import check_inputs

    with pytest.raises(UserInputError, match=re.escape(expected)):
        check_inputs(load_config(str(CONFIG), opts), **kwargs)


def test_several_problems_are_reported_together():
    from nl_detectron.config import load_config
    from nl_detectron.errors import UserInputError
    from nl_detectron.preflight import check_inputs

    cfg = load_config(str(CONFIG), ["MODEL.WEIGHTS", "nowhere.pth", "DATASETS.TEST", "('x',)"])
    with pytest.raises(UserInputError, match="2 problems") as info:
        check_inputs(cfg)
    assert "nowhere.pth" in str(info.value) and "'x'" in str(info.value)


@pytest.mark.parametrize("periodic_first", [True, False])
def test_best_checkpointer_keeps_last_checkpoint(tmp_path, periodic_first):
    """Saving model_best.pth leaves last_checkpoint on the latest periodic checkpoint (or
    absent), unlike detectron2 v0.6's hook."""
    from types import SimpleNamespace

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage
    from torch import nn

    from nl_detectron.checkpoint import BestCheckpointer

    checkpointer = DetectionCheckpointer(nn.Linear(2, 2), save_dir=str(tmp_path))
    hook = BestCheckpointer(10, checkpointer, "segm/AP", mode="max")
    with EventStorage(start_iter=9) as storage:
        hook.trainer = SimpleNamespace(storage=storage, iter=9, max_iter=20)
        if periodic_first:
            checkpointer.save("model_0000009")
        storage.put_scalar("segm/AP", 42.0, smoothing_hint=False)
        hook.after_step()
    assert (tmp_path / "model_best.pth").is_file()
    assert hook.best_metric == 42.0
    last = tmp_path / "last_checkpoint"
    if periodic_first:
        assert last.read_text().strip() == "model_0000009.pth"
    else:
        assert not last.exists()
