"""Ground truth beside predictions (nl_detectron.visualization.predictions) and
tools/visualize_predictions.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
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
    visualize_predictions,
)


def test_prediction_visualiser_on_a_coco_dataset(shapes_dataset: str, tmp_path):
    torch.manual_seed(0)
    predictor = Predictor(tiny_cfg(shapes_dataset))
    paths = visualize_predictions(
        predictor, shapes_dataset, tmp_path, num_images=2, score_threshold=0.0
    )
    assert [p.name for p in paths] == [f"{shapes_dataset}_0000.png", f"{shapes_dataset}_0001.png"]
    for path in paths:
        # Ground truth and prediction of a 96 x 80 image side by side, 8 pixels apart, under
        # a 20-pixel caption.
        assert png_size(path) == (2 * 96 + 8, 80 + 20)
    # The ground truth side has the drawn annotation: it differs from the raw image.
    drawn = np.asarray(Image.open(paths[0]).convert("RGB"))[20:, :96].astype(int)
    raw = np.asarray(Image.open(Path(DatasetCatalog.get(shapes_dataset)[0]["file_name"])))
    assert np.abs(drawn - raw).mean() > 1.0
    assert MetadataCatalog.get(shapes_dataset).thing_classes == ["square"]


def test_prediction_tool(shapes_dataset: str, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg(shapes_dataset).dump())
    load_tool("visualize_predictions").main(
        [
            "--config-file",
            str(config),
            "--indices",
            "2",
            "--scale",
            "2",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert png_size(tmp_path / "out" / f"{shapes_dataset}_0002.png") == (2 * 192 + 8, 160 + 20)


def test_prediction_tool_unknown_dataset(shapes_dataset: str, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg(shapes_dataset).dump())
    with pytest.raises(SystemExit) as exit_info:
        load_tool("visualize_predictions").main(
            ["--config-file", str(config), "--dataset", "nope", "--output", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Dataset 'nope' is not registered" in err and shapes_dataset in err


# ------------------------------------------------------------------------------------------
# Curves
