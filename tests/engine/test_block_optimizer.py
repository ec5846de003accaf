"""MODEL.NONLOCAL.OPTIMIZER "AdamW": the NL blocks' parameters updated by AdamW, the rest of the
detector by Detectron2's SGD, under one schedule, one gradient clipping and one checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from detectron2.solver import build_lr_scheduler
from tiny_detectors import tiny_cfg
from torch import nn
from training_runs import REPO

from nl_detectron.config import load_config
from nl_detectron.engine import Trainer
from nl_detectron.engine.block_optimizer import SGDWithAdamWGroups
from nl_detectron.errors import UserInputError
from nl_detectron.layers import non_local_blocks
from nl_detectron.preflight import check_inputs

CONTEXT_NL = REPO / "configs" / "context" / "mask_rcnn_nl_context.yaml"


def _two_layers() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    return nn.Linear(3, 4), nn.Linear(4, 2)


def _steps(optimizers: list[torch.optim.Optimizer], layers, n: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        for optimizer in optimizers:
            optimizer.zero_grad()
        x = torch.randn(5, 3, generator=gen)
        layers[1](torch.tanh(layers[0](x))).square().sum().backward()
        for optimizer in optimizers:
            optimizer.step()


def test_each_group_follows_its_own_rule():
    # The mixed optimizer's parameters end where torch's SGD and AdamW, each alone on its
    # group, take them: same gradients, same steps.
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    mixed_layers = _two_layers()
    mixed = SGDWithAdamWGroups(
        [
            {"params": list(mixed_layers[0].parameters())},
            {"params": list(mixed_layers[1].parameters()), "lr": 0.01, "adamw": True},
        ],
        **sgd,
    )
    ref_layers = _two_layers()
    ref_sgd = torch.optim.SGD(ref_layers[0].parameters(), **sgd)
    ref_adamw = torch.optim.AdamW(ref_layers[1].parameters(), lr=0.01, weight_decay=1e-4)
    _steps([mixed], mixed_layers)
    _steps([ref_sgd, ref_adamw], ref_layers)
    for a, b in zip(
        [*mixed_layers[0].parameters(), *mixed_layers[1].parameters()],
        [*ref_layers[0].parameters(), *ref_layers[1].parameters()],
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "exp_avg" in mixed.state_dict()["adamw"]["state"][0]
    assert "momentum_buffer" in mixed.state_dict()["sgd"]["state"][0]


def test_state_round_trip_and_refusals():
    layers = _two_layers()
    groups = [
        {"params": list(layers[0].parameters())},
        {"params": list(layers[1].parameters()), "adamw": True},
    ]
    optimizer = SGDWithAdamWGroups(groups, lr=0.1, momentum=0.9)
    _steps([optimizer], layers)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = SGDWithAdamWGroups(groups, lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved)
    torch.testing.assert_close(resumed.state_dict(), saved)
    with pytest.raises(ValueError, match="another MODEL.NONLOCAL.OPTIMIZER"):
        resumed.load_state_dict(torch.optim.SGD(layers[0].parameters(), lr=0.1).state_dict())
    with pytest.raises(ValueError, match="at least one SGD group"):
        SGDWithAdamWGroups([{"params": list(layers[0].parameters())}], lr=0.1)


def test_trainer_gives_the_blocks_adamw_under_the_detectors_schedule_and_clipping():
    cfg = tiny_cfg("FPN")
    cfg.defrost()
    cfg.MODEL.NONLOCAL.OPTIMIZER = "AdamW"
    cfg.MODEL.NONLOCAL.LR_FACTOR = 0.02
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, SGDWithAdamWGroups)
    assert type(optimizer).__name__.endswith("WithGradientClip")
    block_ids = {id(p) for _, b in non_local_blocks(model) for p in b.parameters()}
    assert block_ids
    for group in optimizer.param_groups:
        on_blocks = {id(p) in block_ids for p in group["params"]}
        assert len(on_blocks) == 1  # no group mixes block and detector parameters
        assert bool(group.get("adamw")) == on_blocks.pop()
        factor = 0.02 if group.get("adamw") else 1.0
        assert group["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * factor)
    # A step through Detectron2's clipping wrapper moves both kinds of parameters, and the
    # detector's scheduler scales both rules' learning rates alike.
    scheduler = build_lr_scheduler(cfg, optimizer)
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 0.1)
    optimizer.step()
    after = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    scheduler.step()
    ratios = {g["lr"] / g["initial_lr"] for g in optimizer.param_groups}
    assert len({round(r, 12) for r in ratios}) == 1


def test_the_default_keeps_detectron2s_sgd():
    cfg = tiny_cfg("FPN")
    optimizer = Trainer.build_optimizer(cfg, Trainer.build_model(cfg))
    assert not isinstance(optimizer, SGDWithAdamWGroups)
    assert isinstance(optimizer, torch.optim.SGD)


def test_an_unknown_optimizer_is_refused_by_name():
    cfg = load_config(str(CONTEXT_NL), ["MODEL.NONLOCAL.OPTIMIZER", "Adam", "MODEL.DEVICE", "cpu"])
    with pytest.raises(UserInputError, match="MODEL.NONLOCAL.OPTIMIZER is 'Adam'.*'AdamW'"):
        check_inputs(cfg)


def test_modules_named_to_optimize_with_the_blocks_join_their_groups():
    cfg = tiny_cfg("FPN")
    cfg.defrost()
    cfg.MODEL.NONLOCAL.OPTIMIZER = "AdamW"
    cfg.MODEL.NONLOCAL.LR_FACTOR = 0.02
    cfg.MODEL.NONLOCAL.OPTIMIZE_WITH_BLOCKS = ["roi_heads.box_predictor"]
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    with_blocks = {id(p) for _, b in non_local_blocks(model) for p in b.parameters()}
    with_blocks |= {id(p) for p in model.roi_heads.box_predictor.parameters()}
    adamw = {id(p) for g in optimizer.param_groups if g.get("adamw") for p in g["params"]}
    assert adamw == with_blocks
    for group in optimizer.param_groups:
        factor = 0.02 if group.get("adamw") else 1.0
        assert group["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * factor)
    # a baseline without blocks gets the same rule for the named modules
    vanilla = tiny_cfg("FPN", non_local=False)
    vanilla.defrost()
    vanilla.MODEL.NONLOCAL.OPTIMIZER = "AdamW"
    vanilla.MODEL.NONLOCAL.OPTIMIZE_WITH_BLOCKS = ["roi_heads.box_predictor"]
    model = Trainer.build_model(vanilla)
    assert not non_local_blocks(model)
    optimizer = Trainer.build_optimizer(vanilla, model)
    adamw = {id(p) for g in optimizer.param_groups if g.get("adamw") for p in g["params"]}
    assert adamw == {id(p) for p in model.roi_heads.box_predictor.parameters()}


def test_an_unknown_module_to_optimize_with_the_blocks_is_refused_by_name():
    cfg = tiny_cfg("FPN")
    cfg.defrost()
    cfg.MODEL.NONLOCAL.OPTIMIZE_WITH_BLOCKS = ["roi_heads.box_pred"]
    with pytest.raises(
        UserInputError, match=r"\['roi_heads.box_pred'\].*'roi_heads.box_predictor'"
    ):
        Trainer.build_optimizer(cfg, Trainer.build_model(cfg))
