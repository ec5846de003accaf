"""Mixed precision: SOLVER.AMP.PRECISION / train.amp.precision choose float16 or bfloat16 on both
Detectron2 hosts; bfloat16 runs without loss scaling, here on the CPU."""

from __future__ import annotations

import itertools

import pytest
import torch
from detectron2.utils.events import EventStorage
from tiny_detectors import H, W, nl_model_with_every_head, synthetic_instances
from torch import nn
from training_runs import REPO

from nl_detectron import NonLocalBlock
from nl_detectron.config import load_config
from nl_detectron.engine.amp import AMPTrainer
from nl_detectron.errors import UserInputError
from nl_detectron.preflight import check_inputs

QUICKSTART = REPO / "configs" / "quickstart" / "mask_rcnn_nl_shapes.yaml"


class _Recorder(nn.Module):
    """A one-layer model whose loss records the dtype its layer computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.dtypes: list[torch.dtype] = []

    def forward(self, batch):
        out = self.layer(batch)
        self.dtypes.append(out.dtype)
        return {"loss": out.float().pow(2).mean()}


@pytest.mark.parametrize("precision, scaled", [(torch.bfloat16, False), (torch.float16, True)])
def test_autocast_dtype_and_loss_scaling(precision, scaled):
    model = _Recorder()
    loader = itertools.repeat(torch.randn(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = AMPTrainer(model, loader, optimizer, precision=precision)
    before = model.layer.weight.detach().clone()
    with EventStorage() as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
    assert model.dtypes == [precision]
    assert trainer.grad_scaler.is_enabled() == scaled  # bfloat16 needs no loss scaling
    assert not torch.equal(model.layer.weight, before)  # the step was taken
    state = trainer.state_dict()
    trainer.load_state_dict(state)


def test_nl_detector_trains_a_step_in_bfloat16():
    model = nl_model_with_every_head()
    image = torch.rand(3, H, W) * 255
    batch = [
        {"image": image, "instances": synthetic_instances(2), "height": H, "width": W},
        {"image": image.flip(-1), "instances": synthetic_instances(0), "height": H, "width": W},
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    trainer = AMPTrainer(model, itertools.repeat(batch), optimizer, precision=torch.bfloat16)
    with EventStorage() as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
        losses = {k: v.latest() for k, v in storage.histories().items() if "loss" in k}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    blocks = [m for m in model.modules() if isinstance(m, NonLocalBlock)]
    assert len(blocks) == 6
    for block in blocks:
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_config_key_and_trainer_on_both_config_systems():
    cfg = load_config(str(QUICKSTART), ["SOLVER.AMP.PRECISION", "bfloat16"])
    assert cfg.SOLVER.AMP.PRECISION == "bfloat16"
    assert load_config(str(QUICKSTART)).SOLVER.AMP.PRECISION == "float16"  # Detectron2's


@pytest.mark.parametrize(
    "opts, expected",
    [
        (
            ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "fp8"],
            "SOLVER.AMP.PRECISION is 'fp8'; valid values are 'float16', 'bfloat16'",
        ),
        (
            ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True"],
            "Set SOLVER.AMP.PRECISION bfloat16",
        ),
    ],
)
def test_precision_errors_name_the_key_and_the_fix(opts, expected):
    with pytest.raises(UserInputError, match=expected):
        check_inputs(load_config(str(QUICKSTART), opts))


def test_bfloat16_on_the_cpu_passes_the_checks():
    cfg = load_config(
        str(QUICKSTART),
        ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"],
    )
    check_inputs(cfg)


def test_auto_device(monkeypatch):
    # The bundled configs say "auto": CUDA when there is a GPU, else the CPU; explicit wins.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(str(QUICKSTART)).MODEL.DEVICE == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(str(QUICKSTART)).MODEL.DEVICE == "cuda"
    assert load_config(str(QUICKSTART), ["MODEL.DEVICE", "cpu"]).MODEL.DEVICE == "cpu"
