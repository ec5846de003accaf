"""Short ``tools/train_net.py`` runs of the tiny test config, for the reliability tests.

Runs are subprocesses with one thread each (the tests run on small shared machines), on the
16-image shapes split generated once per test session into a temporary directory. A run's
``metrics.json`` gives the losses of every iteration (``PeriodicWriter`` writes every iteration
with ``SOLVER.MAX_ITER`` below its period of 20).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from detectron2.data.samplers import TrainingSampler

from nl_detectron.data.train_loader import PositionedBatches

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "tests" / "configs" / "tiny_shapes.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"
# The reference run of the reproducibility tests: checkpoints after iterations 1 and 3, and
# model_final (iteration 3).
REFERENCE_RUN = ("SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
LOSS_KEYS = (
    "loss_cls",
    "loss_box_reg",
    "loss_mask",
    "loss_keypoint",
    "loss_rpn_cls",
    "loss_rpn_loc",
)

_session_dir: Optional[Path] = None


def session_dir() -> Path:
    """A temporary directory for this test session (the generated data, shared runs)."""
    global _session_dir
    if _session_dir is None:
        _session_dir = Path(tempfile.mkdtemp(prefix="nl_detectron_runs_"))
        atexit.register(shutil.rmtree, _session_dir, ignore_errors=True)
    return _session_dir


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NL_DETECTRON_DATA"] = str(session_dir() / "data")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_net_command(*args: str) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(TINY_CONFIG), *args]


def train_net(
    *args: str,
    timeout: float = 300,
    config: Optional[Path] = TINY_CONFIG,
    data_root: Optional[Path] = None,
    env: Optional[dict[str, str]] = None,
    script: Path = TRAIN_NET,
) -> subprocess.CompletedProcess:
    """Run ``train_net.py --config-file config *args`` (or another tool, ``script``) to
    completion (``config`` None: ``args`` has its own, or none; the generated data under
    ``data_root`` if given; ``env`` overrides variables of :func:`run_env`). The one way the
    tests run a training or a tool that loads a model."""
    env = {**run_env(), **(env or {})}
    if data_root is not None:
        env["NL_DETECTRON_DATA"] = str(data_root)
    command = [sys.executable, str(script)]
    command += [*(["--config-file", str(config)] if config is not None else []), *args]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


_cache: dict[tuple[str, ...], tuple[Path, subprocess.CompletedProcess]] = {}


def other_cpu_kernels_envs() -> list[dict[str, str]]:
    """Environments under which a run computes the same float32 arithmetic in other
    accumulation orders: two threads instead of one (reductions split across threads), and the
    vector instruction set below the CPU's best for ATen and MKL (other kernels, other blocking).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        aten, mkl = "avx2", "AVX2"
    else:
        aten, mkl = "default", "SSE4_2"
    return [{"OMP_NUM_THREADS": "2"}, {"ATEN_CPU_CAPABILITY": aten, "MKL_ENABLE_INSTRUCTIONS": mkl}]


def cached_run(
    *opts: str, env: Optional[dict[str, str]] = None
) -> tuple[Path, subprocess.CompletedProcess]:
    """A successful run of the tiny config with ``opts`` (KEY VALUE overrides) and ``env``, made
    once per session: tests that need the same reference run share it. Returns its OUTPUT_DIR
    and the completed process."""
    key = (*opts, *(f"{k}={v}" for k, v in sorted((env or {}).items())))
    if key not in _cache:
        output_dir = Path(tempfile.mkdtemp(prefix="run_", dir=session_dir()))
        proc = train_net(*opts, "OUTPUT_DIR", str(output_dir), env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _cache[key] = output_dir, proc
    return _cache[key]


def losses(output_dir: Path) -> dict[int, dict[str, float]]:
    """Iteration -> loss terms, from ``metrics.json``."""
    result = {}
    with open(output_dir / "metrics.json", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "total_loss" in record:
                result[record["iteration"]] = {
                    k: record[k] for k in (*LOSS_KEYS, "total_loss") if k in record
                }
    return result


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def non_local_weights(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the non-local blocks in a checkpoint."""
    return {k: v for k, v in model_weights(path).items() if ".non_local_" in k}


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]


def positioned_batches(
    world_size: int,
    rank: int,
    batch_size: int,
    *,
    group_ids: Optional[list[int]] = None,
    start: int = 0,
    count: int = 12,
) -> list[list[tuple[int, int]]]:
    """The first ``count`` training batches, as ``(position, index)`` pairs, that process
    ``rank`` of ``world_size`` gets from a 10-image dataset (seed 3), from batch ``start`` on."""
    sampler = TrainingSampler(10, seed=3)
    sampler._rank, sampler._world_size = rank, world_size
    batches = PositionedBatches(sampler, batch_size, group_ids, start, rank, world_size)
    return list(itertools.islice(batches, count))
