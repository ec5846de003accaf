"""Where the supported Detectron2 hosts differ, and the workarounds of their gaps, in one place.

Two hosts are supported (README, "Support matrix"): the registry build of v0.6 that ``make``
provisions, and official Detectron2 main built from source. Their ``__version__`` is the same
("0.6"), so each difference is probed by behaviour, once, at import. A workaround is applied only
on the hosts that need it; what a host already does is left to it. Each gap still open on main is
described for upstream in ``docs/upstream.md``; ``tests/test_compat.py`` pins every probe to the
host it is run on, so a fixed gap shows up as a failing test.

Gaps of both hosts, worked around elsewhere (each module says why):

- ``fvcore`` writes checkpoints and ``last_checkpoint`` in place: a kill leaves them truncated
  (:mod:`nl_detectron.checkpoint.atomic`);
- ``hooks.BestCheckpointer`` re-points ``last_checkpoint`` at ``model_best.pth``
  (:mod:`nl_detectron.checkpoint.best`);
- a resumed run restarts the training data from its first batch
  (:mod:`nl_detectron.data.train_loader`);
- ``AMPTrainer`` autocasts to float16 only (v0.6) or takes a precision that no yacs key sets
  (main), and asserts CUDA (:mod:`nl_detectron.engine.amp`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import detectron2.engine.defaults as d2_defaults
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.utils import comm
from torch import nn

__all__ = [
    "CHECKPOINTER_TAKES_URL_QUERIES",
    "HAS_CPP_EXTENSION",
    "LAUNCH_RUNS_CPU_PROCESSES",
    "LAZY_DATA_LOADER_ITER",
    "TRAINER_HAS_AFTER_BACKWARD",
    "TRAINER_SAVES_TRAINER_STATE",
    "WRITE_METRICS_LOGS_TRACEBACK",
    "create_ddp_model",
    "ddp_on_any_device",
    "host_description",
    "reset_checkpointer_after_failed_load",
    "restart_data_loader",
]

logger = logging.getLogger(__name__)


def _has_cpp_extension() -> bool:
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "PURE_PYTHON_BUILD", False)


# The compiled extension (rotated boxes, deformable conv, the C++ COCOeval); the registry build
# has a stand-in that raises when used.
HAS_CPP_EXTENSION: bool = _has_cpp_extension()

# main (2022-06): ``SimpleTrainer._data_loader_iter`` is a lazy read-only property, and
# ``reset_data_loader`` restarts it; v0.6 creates the iterator in ``train()`` as an attribute.
LAZY_DATA_LOADER_ITER: bool = isinstance(
    inspect.getattr_static(SimpleTrainer, "_data_loader_iter", None), property
)

# main: ``DefaultTrainer.state_dict`` holds the optimizer's state (and ``load_state_dict``
# requires it); v0.6 saves iteration and hook states only, so ``--resume`` resets momentum.
TRAINER_SAVES_TRAINER_STATE: bool = DefaultTrainer.state_dict is not TrainerBase.state_dict

# main (2023-01): ``launch`` starts CPU processes with gloo when there is no GPU; v0.6 asserts
# CUDA and hard-codes NCCL for more than one process.
# (The module, which detectron2.engine's function ``launch`` hides from attribute access.)
_LAUNCH_SOURCE = inspect.getsource(importlib.import_module("detectron2.engine.launch"))
LAUNCH_RUNS_CPU_PROCESSES: bool = "GLOO" in _LAUNCH_SOURCE.upper()

# main: ``DetectionCheckpointer.load`` takes ``path?matching_heuristics=True``; it keeps the
# parsed URL in ``_parsed_url_during_load`` and resets it only when the load succeeds.
CHECKPOINTER_TAKES_URL_QUERIES: bool = "_parsed_url_during_load" in inspect.getsource(
    DetectionCheckpointer.load
)

# main (2023-04): ``SimpleTrainer`` logs an exception raised while writing the metrics (the
# FloatingPointError of a NaN loss) with its traceback before re-raising it.
WRITE_METRICS_LOGS_TRACEBACK: bool = "Exception in writing metrics" in inspect.getsource(
    SimpleTrainer
)


# main (2023-04): hooks have ``after_backward``, which ``SimpleTrainer.run_step`` calls between
# the backward pass and the optimizer step; a step written for both hosts calls it where it exists.
TRAINER_HAS_AFTER_BACKWARD: bool = hasattr(TrainerBase, "after_backward")


def host_description() -> str:
    """One line naming the Detectron2 host, for logs and test headers."""
    import detectron2

    kind = "official build with C++ extension" if HAS_CPP_EXTENSION else "pure-Python build"
    era = "main" if LAZY_DATA_LOADER_ITER else "v0.6"
    return f"Detectron2 {detectron2.__version__} ({era} behaviour, {kind})"


# ---------------------------------------------------------------------------------------------
# Training loop


def restart_data_loader(trainer: SimpleTrainer, loader: Iterable[Any]) -> None:
    """Make ``trainer`` draw its next batch from a new ``iter(loader)``, e.g. after the loader
    was told where a resumed run starts. main: ``reset_data_loader``; v0.6: the attribute."""
    if LAZY_DATA_LOADER_ITER:
        trainer.reset_data_loader(lambda: loader)
    else:
        trainer._data_loader_iter = iter(loader)


# Both hosts: ``create_ddp_model`` passes ``device_ids=[local_rank]``, which
# ``DistributedDataParallel`` refuses for a CPU model.
_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Detectron2's ``create_ddp_model`` (``DistributedDataParallel`` when there is more than one
    process), which also wraps CPU models: those take ``device_ids=None``."""
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        if all(p.device.type == "cpu" for p in model.parameters()):
            kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def ddp_on_any_device() -> Iterator[None]:
    """Within this context, ``DefaultTrainer.__init__`` wraps a CPU model in DDP correctly: it
    calls the module-level ``create_ddp_model`` of ``detectron2.engine.defaults``, which is
    :func:`create_ddp_model` while the context lasts."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


# ---------------------------------------------------------------------------------------------
# Checkpoints


def reset_checkpointer_after_failed_load(checkpointer: DetectionCheckpointer) -> None:
    """After a failed ``load``, let the next one start clean: main's ``load`` asserts that no
    other load is in progress, and only a successful load resets its marker."""
    if CHECKPOINTER_TAKES_URL_QUERIES:
        checkpointer._parsed_url_during_load = None
