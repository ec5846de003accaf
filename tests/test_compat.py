"""The Detectron2 host differences of nl_detectron.compat: each probe is pinned to the host the
suite runs on, each upstream gap is shown as it is on that host, and the workaround is shown to
close it. When upstream fixes a gap, its test here fails and says which workaround to remove."""

from __future__ import annotations

import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer
from torch import nn

import nl_detectron.compat as compat
from nl_detectron.checkpoint import NonLocalCheckpointer
from nl_detectron.errors import CheckpointError

# The behaviours that tell the two hosts apart; on each host they agree.
MAIN_BEHAVIOURS = (
    "LAZY_DATA_LOADER_ITER",
    "TRAINER_SAVES_TRAINER_STATE",
    "LAUNCH_RUNS_CPU_PROCESSES",
    "CHECKPOINTER_TAKES_URL_QUERIES",
    "WRITE_METRICS_LOGS_TRACEBACK",
)
ON_MAIN = compat.LAZY_DATA_LOADER_ITER
HOST = "Detectron2 main" if ON_MAIN else "Detectron2 v0.6"


def test_the_host_is_v0_6_or_main():
    probes = {name: getattr(compat, name) for name in MAIN_BEHAVIOURS}
    # All True (main, 2023 and later) or all False (v0.6): a mixture is a host nl_detectron has
    # not been tested on.
    assert len(set(probes.values())) == 1, probes
    assert ("main" if ON_MAIN else "v0.6") in compat.host_description()


class _Counting(torch.utils.data.IterableDataset):
    def __init__(self) -> None:
        self.start = 0

    def __iter__(self):
        return iter(range(self.start, 10**6))


def _simple_trainer(loader) -> SimpleTrainer:
    model = nn.Linear(1, 1)
    return SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1))


def test_data_loader_restarts_on_both_hosts():
    loader = _Counting()
    trainer = _simple_trainer(loader)
    if ON_MAIN:  # main: a read-only property, created on first use
        with pytest.raises(AttributeError):
            trainer._data_loader_iter = iter(loader)
        assert next(trainer._data_loader_iter) == 0
    loader.start = 7  # e.g. the iteration a resumed run starts from
    compat.restart_data_loader(trainer, loader)
    assert next(trainer._data_loader_iter) == 7
    assert next(trainer._data_loader_iter) == 8


def test_detectron2_wraps_cpu_models_for_gpus_and_the_workaround_does_not(monkeypatch):
    # Both hosts: create_ddp_model passes device_ids=[local rank], which DDP refuses for a CPU
    # module ("device_ids can only be None or contain a single element" for CPU modules).
    calls = []

    def fake_ddp(model, **kwargs):
        calls.append(kwargs)
        return model

    import detectron2.engine.defaults as d2_defaults

    monkeypatch.setattr(d2_defaults, "DistributedDataParallel", fake_ddp)
    monkeypatch.setattr(d2_defaults.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(d2_defaults.comm, "get_local_rank", lambda: 0)
    model = nn.Linear(2, 2)
    d2_defaults.create_ddp_model(model)
    assert calls[-1]["device_ids"] == [0], f"{HOST} fixed the gap: remove compat.create_ddp_model"
    compat.create_ddp_model(model)
    assert calls[-1]["device_ids"] is None


def _corrupt(tmp_path) -> str:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    return str(path)


def _good(tmp_path, model: nn.Module) -> str:
    torch.save({"model": model.state_dict()}, tmp_path / "good.pth")
    return str(tmp_path / "good.pth")


def test_a_failed_load_does_not_break_the_next_one(tmp_path):
    model = nn.Linear(2, 2)
    corrupt, good = _corrupt(tmp_path), _good(tmp_path, model)
    plain = DetectionCheckpointer(model)
    with pytest.raises(Exception):  # noqa: B017  (whatever torch.load raises)
        plain.load(corrupt)
    if compat.CHECKPOINTER_TAKES_URL_QUERIES:  # main: the next load asserts
        with pytest.raises(AssertionError):
            plain.load(good)
    ours = NonLocalCheckpointer(model)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ours.load(corrupt)
    ours.load(good)  # works on both hosts


def test_url_queries_where_the_host_reads_them(tmp_path):
    model = nn.Linear(2, 2)
    good = _good(tmp_path, model)
    checkpointer = NonLocalCheckpointer(model)
    if compat.CHECKPOINTER_TAKES_URL_QUERIES:
        checkpointer.load(f"{good}?matching_heuristics=True")
        assert "names matched by suffix" in checkpointer.report.source
    else:
        with pytest.raises(CheckpointError, match=r"v0\.6\) does not read a '\?matching_h"):
            checkpointer.load(f"{good}?matching_heuristics=True")


def test_trainer_state_is_saved_once(caplog):
    from training_runs import TINY_CONFIG

    from nl_detectron.config import load_config
    from nl_detectron.engine import Trainer

    cfg = load_config(str(TINY_CONFIG), ["DATASETS.TRAIN", "('nl_shapes_mini',)"])
    trainer = Trainer(cfg)
    state = trainer.state_dict()
    assert set(state["_trainer"]) >= {"optimizer"}
    with caplog.at_level(logging.WARNING):
        trainer.load_state_dict({k: v for k, v in state.items() if k != "_trainer"})
    assert "no optimizer state" in caplog.text
    trainer.load_state_dict(state)
