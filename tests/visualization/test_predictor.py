"""The detector wrapper of the figures (nl_detectron.visualization.predictor)."""

import numpy as np
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
    compute_attention_maps,
)


def test_predictor_reports_blocks_the_checkpoint_lacks(tmp_path, caplog, image: np.ndarray):
    torch.manual_seed(0)
    vanilla, nl = Predictor(tiny_cfg()), Predictor(tiny_cfg(pairwise="dot_product"))
    torch.save({"model": vanilla.model.state_dict()}, tmp_path / "vanilla.pth")
    torch.save({"model": nl.model.state_dict()}, tmp_path / "nl.pth")
    cfg = tiny_cfg(pairwise="dot_product")
    cfg.MODEL.WEIGHTS = str(tmp_path / "nl.pth")
    assert Predictor(cfg).blocks_without_weights == []
    cfg.MODEL.WEIGHTS = str(tmp_path / "vanilla.pth")
    predictor = Predictor(cfg)
    assert predictor.blocks_without_weights == [
        "backbone.bottom_up.res4.non_local_before_5",
        "roi_heads.keypoint_head.non_local_after_conv_fcn2",
    ]
    compute_attention_maps(predictor, image, [(5, 5)])
    assert "non_local_before_5 has no weights in" in caplog.text
