"""benchmarks/coco_size_input.py: the COCO configs' own test loaders read its stand-in for COCO
val2017 and give 800 x 1333 inputs (BENCHMARKS.md, "COCO-size cost with Detectron2's
analyze_model")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from training_runs import REPO

# In a child process: Detectron2 registers its builtin COCO datasets under $DETECTRON2_DATASETS
# when it is first imported.
_CHECK = """
from detectron2.config import LazyConfig, instantiate
for config in ("mask_rcnn_R_50_FPN_1x_nl.py", "keypoint_rcnn_R_50_FPN_1x_nl.py"):
    cfg = LazyConfig.load("configs/" + config)
    cfg.dataloader.test.num_workers = 0
    shapes = [tuple(batch[0]["image"].shape) for batch in instantiate(cfg.dataloader.test)]
    print(config, shapes)
"""


@pytest.mark.slow
def test_coco_configs_load_it_at_coco_size(tmp_path):
    script = REPO / "benchmarks" / "coco_size_input.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=300)
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = "[(3, 800, 1333), (3, 800, 1333)]"
    assert proc.stdout.splitlines() == [
        f"mask_rcnn_R_50_FPN_1x_nl.py {sizes}",
        f"keypoint_rcnn_R_50_FPN_1x_nl.py {sizes}",
    ]
