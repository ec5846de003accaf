"""Training curves from metrics.json (nl_detectron.visualization.curves) and
tools/plot_metrics.py."""

import pytest
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
    load_metrics,
)


def test_load_metrics(tmp_path):
    run = load_metrics(write_metrics(tmp_path / "nl", {"loss_cls": 1.0}, 30.0, resumed=True))
    assert run.label == "nl"
    assert run.loss_keys() == ["total_loss", "loss_cls"]
    assert dict(run.scalars["total_loss"])[279] == 0.123  # the later line wins
    assert [it for it, _ in run.scalars["bbox/AP"]] == [99, 199, 299]
    assert run.scalars["segm/AP"][0] == (99, 30.0)
    assert "keypoints/AP" not in run.scalars


def test_plot_metrics_two_runs(tmp_path):
    baseline = write_metrics(tmp_path / "baseline", {"loss_cls": 1.0, "loss_mask": 0.7}, 30.0)
    nl = write_metrics(tmp_path / "nl", {"loss_cls": 0.9, "loss_box_reg": 0.5}, 33.0)
    out = tmp_path / "curves.png"
    load_tool("plot_metrics").main([str(baseline), f"NL={nl}", "--output", str(out)])
    # total_loss, loss_box_reg, loss_cls, loss_mask, bbox/AP, segm/AP: 3 columns, 2 rows.
    assert png_size(out) == (3 * 420, 2 * 300 + 30)


def test_plot_metrics_errors(tmp_path, capsys):
    tool = load_tool("plot_metrics")
    run = write_metrics(tmp_path / "run", {"loss_cls": 1.0}, 30.0)
    for argv, message in [
        ([str(tmp_path / "nowhere")], "nowhere': it does not exist"),
        ([str(tmp_path)], f"Run folder '{tmp_path}' has no metrics.json"),
        ([str(run), str(run)], "Several runs are labelled run; name them with LABEL=PATH"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv + ["--output", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Demo figures
