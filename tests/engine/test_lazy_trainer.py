"""Python (LazyConfig) configs and tools/lazyconfig_train_net.py: every config instantiates,
each yacs config and its Python twin build the same model, and the lazy quickstart trains,
resumes and evaluates on the bundled data."""

from __future__ import annotations

import json

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from training_runs import REPO, assert_no_traceback, train_net

from nl_detectron.config import load_config

CONFIGS = REPO / "configs"
PYTHON_CONFIGS = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.py"))
# A yacs config and its Python twin.
PAIRS = [
    ("mask_rcnn_baseline.yaml", "mask_rcnn_R_50_FPN_1x_baseline.py"),
    ("mask_rcnn_nl.yaml", "mask_rcnn_R_50_FPN_1x_nl.py"),
    ("quickstart/mask_rcnn_nl_shapes.yaml", "quickstart/mask_rcnn_nl_shapes.py"),
]
LAZY_TOOL = REPO / "tools" / "lazyconfig_train_net.py"


@pytest.mark.parametrize("name", PYTHON_CONFIGS, ids=str)
def test_python_config_instantiates(name):
    cfg = LazyConfig.load(str(CONFIGS / name))
    model = instantiate(cfg.model)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("yacs, lazy", PAIRS, ids=[p[1] for p in PAIRS])
def test_yacs_and_python_configs_build_the_same_model(yacs, lazy):
    a = build_model(load_config(str(CONFIGS / yacs), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]))
    b = instantiate(LazyConfig.load(str(CONFIGS / lazy)).model)
    assert a.state_dict().keys() == b.state_dict().keys()
    gen = torch.Generator().manual_seed(0)
    weights = {
        k: torch.randn(v.shape, generator=gen) * 0.05
        if v.is_floating_point() and "running_var" not in k
        else v
        for k, v in a.state_dict().items()
    }
    a.load_state_dict(weights), b.load_state_dict(weights)
    a.eval(), b.eval()
    a.roi_heads.box_predictor.test_score_thresh = b.roi_heads.box_predictor.test_score_thresh = 0
    image = torch.rand(3, 160, 192, generator=gen) * 255
    with torch.no_grad():
        (da,), (db,) = a([{"image": image}]), b([{"image": image}])
    fa, fb = da["instances"].get_fields(), db["instances"].get_fields()
    assert fa.keys() == fb.keys() and len(da["instances"]) > 0
    for key in fa:
        x, y = fa[key], fb[key]
        x, y = (x.tensor, y.tensor) if hasattr(x, "tensor") else (x, y)
        assert torch.equal(x, y), key


def _lazy(*args: str):
    return train_net(*args, config=None, script=LAZY_TOOL)


@pytest.mark.slow
def test_lazy_quickstart_trains_resumes_and_evaluates(tmp_path):
    quickstart = str(CONFIGS / "quickstart" / "mask_rcnn_nl_shapes.py")
    common = [
        "--config-file", quickstart, f"train.output_dir={tmp_path}", "train.max_iter=4",
        "train.eval_period=2", "train.checkpointer.period=2", "train.precise_bn.num_iter=2",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.dataset_dicts.names=nl_shapes_mini",
        "dataloader.test.dataset.names=nl_shapes_mini",
        "dataloader.evaluator.dataset_name=nl_shapes_mini",
    ]  # fmt: skip
    proc = _lazy(*common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_no_traceback(proc)
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    evaluations = sorted((r for r in records if "bbox/AP" in r), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in evaluations] == [1, 4]  # train.eval_period, then the end
    assert {"bbox/AP", "segm/AP", "keypoints/AP"} <= set(evaluations[0])
    assert (tmp_path / "model_best.pth").is_file() and list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    resumed = _lazy("--resume", *common, "train.max_iter=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from iteration 4" in resumed.stdout + resumed.stderr

    evaluated = _lazy("--eval-only", *common, f"train.init_checkpoint={tmp_path}/model_final.pth")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "copypaste: Task: bbox" in evaluated.stdout + evaluated.stderr


def test_lazy_tool_reports_a_bad_override_without_traceback():
    proc = _lazy("--config-file", str(CONFIGS / "mask_rcnn_R_50_FPN_1x_nl.py"), "train.max_iter")
    assert proc.returncode != 0
    assert_no_traceback(proc)
    assert "train.max_iter" in proc.stderr and "key=value" in proc.stderr


def test_lazy_tool_reports_a_missing_dataset_without_traceback(tmp_path):
    proc = _lazy(
        "--config-file", str(CONFIGS / "mask_rcnn_R_50_FPN_1x_nl.py"),
        f"train.output_dir={tmp_path}", "train.init_checkpoint=", "train.device=cpu",
    )  # fmt: skip
    assert proc.returncode != 0
    assert_no_traceback(proc)
    assert "coco_2017_train" in proc.stderr and "dataloader.train.dataset.names" in proc.stderr
