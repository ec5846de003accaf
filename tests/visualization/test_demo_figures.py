"""The figures of make demo (nl_detectron.visualization.demo_figures) and tools/demo_figures.py."""

import pytest
import torch
from viz_helpers import (  # noqa: F401
    KEYPOINT_NAMES,
    PAIRWISE,
    load_tool,
    one_hot_block,
    png_size,
    tiny_cfg,
    write_metrics,
)

from nl_detectron.visualization import (
    Predictor,
)


def test_demo_figures(shapes_dataset: str, tmp_path):
    run, baseline = tmp_path / "nl", tmp_path / "baseline"
    cfg = tiny_cfg(shapes_dataset, pairwise="embedded_gaussian")
    write_metrics(run, {"loss_cls": 0.9, "loss_keypoint": 3.0}, 33.0)
    write_metrics(baseline, {"loss_cls": 1.0, "loss_keypoint": 3.2}, 30.0)
    (run / "config.yaml").write_text(cfg.dump())
    torch.save({"model": Predictor(cfg).model.state_dict()}, run / "model_final.pth")
    out = tmp_path / "figures"
    load_tool("demo_figures").main([str(run), "--baseline", str(baseline), "--output", str(out)])
    # 3 queries x 2 blocks of 240-pixel panels; 3 images of 96 x 80 drawn at scale 2 beside
    # their ground truth; total_loss, loss_cls, loss_keypoint, bbox/AP, segm/AP in 3 columns.
    expected = {
        "attention_map.png": (3 * 240, 2 * 240),
        "predictions.png": (2 * 192 + 8, 3 * (160 + 20) + 2 * 8),
        "training_curves.png": (3 * 420, 2 * 300 + 30),
    }
    for name, size in expected.items():
        assert png_size(out / name) == size
        assert (out / name).stat().st_size < 300_000


def test_demo_figures_need_a_finished_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("demo_figures").main([str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'config.yaml'} does not exist" in capsys.readouterr().err
