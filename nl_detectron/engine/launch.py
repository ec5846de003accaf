"""Multi-process training: on GPUs with NCCL (Detectron2's ``launch``), on CPUs with gloo.

Detectron2 v0.6's ``launch`` asserts CUDA and hard-codes NCCL as soon as there is more than one
process; main's runs CPU processes with gloo
(:data:`nl_detectron.compat.LAUNCH_RUNS_CPU_PROCESSES`).
:func:`launch` hands GPU runs, and CPU runs on main, to Detectron2's ``launch``, and on v0.6 runs
CPU processes itself with the gloo backend, set up the way Detectron2 sets up its workers (global
rank, the per-machine process group of ``detectron2.utils.comm``, a barrier). On both it checks
``--dist-url`` first and reports a user error in a worker without a traceback;
:class:`ReplicaConsistencyCheck` verifies at the end of training that all processes hold the same
weights.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import HookBase
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..compat import LAUNCH_RUNS_CPU_PROCESSES
from ..errors import CheckpointError, UserInputError

__all__ = [
    "DEFAULT_TIMEOUT",
    "ReplicaConsistencyCheck",
    "ReportUserErrors",
    "backend_for_device",
    "find_free_port",
    "launch",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# Exit status of a worker that stopped on a UserInputError (after printing it).
_USER_ERROR_EXIT = 1


def backend_for_device(device: str) -> str:
    """The process-group backend for a model on ``device`` (``cfg.MODEL.DEVICE``): ``"nccl"``
    for CUDA devices, ``"gloo"`` for the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (another process may still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def launch(
    main_func: Callable[..., Any],
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: Optional[str] = None,
) -> Any:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each machine.

    Call it on every machine of the job, as Detectron2's ``launch`` (same arguments; ``--num-gpus``
    is ``num_processes_per_machine``).

    Args:
        main_func: the function every process runs; picklable (module level) for more than one
            process.
        num_processes_per_machine: processes per machine: one per GPU with NCCL; with gloo, any
            number (each gets ``cpu_count // num_processes_per_machine`` threads unless
            ``OMP_NUM_THREADS`` is set).
        num_machines, machine_rank: the number of machines and this one's rank (0 is the one
            ``dist_url`` points at).
        dist_url: ``tcp://HOST:PORT`` of machine 0 (or ``file://``), or ``"auto"`` for a free
            port on 127.0.0.1 (one machine only).
        timeout: how long collectives wait for the other processes.
        backend: ``"nccl"`` (Detectron2's launch, unchanged), ``"gloo"`` (CPU processes), or
            None: NCCL if CUDA is available, else gloo. Use :func:`backend_for_device`.

    Returns:
        What ``main_func`` returns for a single process; None otherwise.

    Raises:
        UserInputError: a bad ``dist_url`` or ``backend``.
        SystemExit: a process stopped on a :class:`UserInputError` or ``CheckpointError`` (its
            message is printed to stderr by that process).
    """
    world_size = num_machines * num_processes_per_machine
    if world_size < 1 or not 0 <= machine_rank < num_machines:
        raise UserInputError(
            f"--num-gpus {num_processes_per_machine} --num-machines {num_machines} "
            f"--machine-rank {machine_rank}: need at least one process per machine and "
            f"0 <= machine rank < number of machines."
        )
    if world_size == 1:
        return main_func(*args)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    backend = backend.lower()
    if backend not in ("nccl", "gloo"):
        raise UserInputError(f"Unknown distributed backend {backend!r}; use 'nccl' or 'gloo'.")
    threads = 0
    if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        # The processes share the machine's cores.
        threads = max(1, (os.cpu_count() or 1) // num_processes_per_machine)
    wrapped = ReportUserErrors(main_func, num_threads=threads)
    try:
        if backend == "gloo":
            dist_url = _resolve_dist_url(dist_url, num_machines, machine_rank)
        if backend == "nccl" or (LAUNCH_RUNS_CPU_PROCESSES and not torch.cuda.is_available()):
            d2_launch(
                wrapped,
                num_processes_per_machine,
                num_machines=num_machines,
                machine_rank=machine_rank,
                dist_url=dist_url,
                args=tuple(args),
                timeout=timeout,
            )
        else:
            mp.start_processes(
                _gloo_worker,
                nprocs=num_processes_per_machine,
                args=(
                    wrapped,
                    world_size,
                    num_processes_per_machine,
                    machine_rank,
                    dist_url,
                    tuple(args),
                    timeout,
                ),
                daemon=False,
                start_method="spawn",
            )
    except mp.ProcessExitedException as e:
        if e.exit_code == _USER_ERROR_EXIT:
            raise SystemExit(_USER_ERROR_EXIT) from None  # the worker printed why
        raise
    return None


class ReportUserErrors:
    """``main_func`` for a worker process: a :class:`UserInputError` or a
    :class:`~nl_detectron.errors.CheckpointError` is printed to stderr, without a
    traceback, and ends the process with status 1 (the launcher then stops the others).
    """

    def __init__(self, main_func: Callable[..., Any], num_threads: int = 0) -> None:
        self.main_func = main_func
        self.num_threads = num_threads  # torch threads of the process; 0: torch's default

    def __call__(self, *args: Any) -> Any:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            return self.main_func(*args)
        except (UserInputError, CheckpointError) as e:
            rank = comm.get_rank()
            print(f"error (process {rank} of {comm.get_world_size()}): {e}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(_USER_ERROR_EXIT)


def _resolve_dist_url(dist_url: Optional[str], num_machines: int, machine_rank: int) -> str:
    """``dist_url`` with ``"auto"`` replaced by a free local port; a busy local port is refused
    with the fix (Detectron2's default port stays taken by an orphaned or concurrent run)."""
    if dist_url == "auto":
        if num_machines > 1:
            raise UserInputError(
                "--dist-url auto picks a port on this machine and only works with "
                "--num-machines 1. Pass --dist-url tcp://<address of machine 0>:<free port> on "
                "every machine."
            )
        return f"tcp://127.0.0.1:{find_free_port()}"
    if not dist_url:
        raise UserInputError(
            "Multi-process training needs --dist-url: tcp://<address of machine 0>:<port>, or "
            "auto on a single machine."
        )
    url = urlparse(dist_url)
    if url.scheme not in ("tcp", "file", "env"):
        raise UserInputError(
            f"--dist-url {dist_url!r}: use tcp://HOST:PORT, file:///shared/path or auto."
        )
    local = url.hostname in ("127.0.0.1", "localhost")
    if url.scheme == "tcp" and local and machine_rank == 0 and url.port is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((url.hostname, url.port))
            except OSError:
                raise UserInputError(
                    f"--dist-url {dist_url}: port {url.port} is in use, probably by another "
                    "training run or an orphaned process of an earlier one. Pass --dist-url auto "
                    "(a free port) or another port."
                ) from None
    return dist_url


def _gloo_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple[Any, ...],
    timeout: timedelta,
) -> None:
    """One CPU training process, set up as Detectron2's ``_distributed_worker`` sets up a GPU one
    (without the CUDA device): for hosts whose ``launch`` cannot (v0.6)."""
    global_rank = machine_rank * num_processes_per_machine + local_rank
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=global_rank,
        timeout=timeout,
    )
    # The group of the processes on this machine (comm.get_local_rank(), get_local_size()).
    assert comm._LOCAL_PROCESS_GROUP is None
    num_machines = world_size // num_processes_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
    comm.synchronize()
    dist.destroy_process_group()


class ReplicaConsistencyCheck(HookBase):
    """After a completed multi-process training, checks that every process holds the same
    parameters (DDP keeps them bitwise identical; a difference means a broken synchronisation)
    and logs the result; a difference is logged as an error naming the first parameter."""

    def after_train(self) -> None:
        if comm.get_world_size() == 1 or self.trainer.iter < self.trainer.max_iter:
            return  # one process, or training stopped early (other processes may be gone)
        model = self.trainer.model
        model = model.module if isinstance(model, DistributedDataParallel) else model
        # Per parameter: sum and sum of squares in float64, a fingerprint of its values.
        names, stats = [], []
        for name, param in model.named_parameters():
            values = param.detach().double()
            names.append(name)
            stats.append(torch.stack([values.sum(), (values * values).sum()]).cpu())
        fingerprints = comm.all_gather(torch.stack(stats) if stats else torch.zeros(0, 2))
        differing = [
            names[i]
            for i in range(len(names))
            if any(not torch.equal(f[i], fingerprints[0][i]) for f in fingerprints[1:])
        ]
        if differing:
            logger.error(
                f"After training, {len(differing)} parameter(s) differ between the "
                f"{len(fingerprints)} processes (first: {differing[0]}): the processes were not "
                "synchronised. Do not use this model; report the problem."
            )
        else:
            logger.info(
                f"After training, all {len(names)} parameters are identical in the "
                f"{len(fingerprints)} processes."
            )
