"""Numerics: a diverging run stops with the iteration and the likely causes and keeps its last good
checkpoint; NaN weights are never saved; mixed precision (bf16 autocast on CPU) stays finite."""

from __future__ import annotations

import math
import re

import pytest
import torch
from detectron2.utils.events import EventStorage
from training_runs import TINY_CONFIG, assert_no_traceback, model_weights, train_net

from nl_detectron.checkpoint import AtomicCheckpointer
from nl_detectron.config import load_config
from nl_detectron.engine import Trainer
from nl_detectron.errors import TrainingDivergedError, UserInputError
from nl_detectron.preflight import check_inputs


@pytest.mark.slow
def test_nan_loss_stops_training_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    # lr 1000 without warm-up: the loss becomes NaN within a few iterations; every iteration
    # before it is checkpointed.
    proc = train_net(
        *("SOLVER.BASE_LR", "1000.0", "SOLVER.WARMUP_ITERS", "0"),
        *("SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.MAX_ITER", "10"),
        *("OUTPUT_DIR", str(tmp_path)),
    )
    assert proc.returncode != 0
    assert_no_traceback(proc)
    error = proc.stderr[proc.stderr.index("error: ") :]
    match = re.match(r"error: Training diverged at iteration (\d+): (\w+)=(nan|inf|-inf) ", error)
    assert match, error
    iteration = int(match.group(1))
    assert iteration >= 1, "diverged before the first checkpoint: raise the test's lr less"
    assert "SOLVER.BASE_LR 1000, SOLVER.IMS_PER_BATCH 4, SOLVER.WARMUP_ITERS 0" in error
    assert "bad annotations" in error
    last = f"model_{iteration - 1:07d}.pth"
    assert f"The last complete checkpoint, {tmp_path / last}, is unchanged" in error
    # The log has the message as one line, too.
    assert f"Training stopped: Training diverged at iteration {iteration}" in proc.stdout

    assert (tmp_path / "last_checkpoint").read_text() == last
    assert not (tmp_path / "model_final.pth").exists()
    weights = model_weights(tmp_path / last)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_checkpointer_refuses_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000", iteration=0)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(
        TrainingDivergedError,
        match=r"Not saving checkpoint model_0000001\.pth after iteration 1: 1 weight tensor\(s\) "
        r".* NaN or infinite \(first: weight\).*model_0000000\.pth is kept",
    ):
        checkpointer.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert not (tmp_path / "model_0000001.pth").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_float16_amp_on_cpu_is_refused_before_training():
    cfg = load_config(str(TINY_CONFIG), ["SOLVER.AMP.ENABLED", "True"])
    with pytest.raises(
        UserInputError,
        match=r"float16 autocast is for GPUs.*SOLVER\.AMP\.PRECISION bfloat16.*"
        r"SOLVER\.AMP\.ENABLED False",
    ):
        check_inputs(cfg)


def test_model_stays_finite_under_bf16_autocast_on_cpu():
    cfg = load_config(str(TINY_CONFIG), ["TEST.DETECTIONS_PER_IMAGE", "5"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    batch = next(iter(Trainer.build_train_loader(cfg)))[:2]
    for block in (m for n, m in model.named_modules() if n.endswith("out_norm")):
        torch.nn.init.ones_(block.weight)  # the NL blocks contribute (they start as identities)
    with torch.autocast("cpu", dtype=torch.bfloat16), EventStorage():
        losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model([{"image": d["image"]} for d in batch])
    for output in outputs:
        instances = output["instances"]
        assert torch.isfinite(instances.scores).all()
        assert torch.isfinite(instances.pred_boxes.tensor).all()
