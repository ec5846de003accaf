"""Interrupted runs: ``kill -9`` during training and while a checkpoint is being written, then
``--resume``: it continues from the last complete checkpoint and ends with exactly the weights of
the uninterrupted run. Checkpoints and ``last_checkpoint`` are never seen half-written."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from training_runs import (
    REFERENCE_RUN,
    REPO,
    TRAIN_NET,
    assert_no_traceback,
    cached_run,
    model_weights,
    positioned_batches,
    run_env,
    train_net,
    train_net_command,
)

from nl_detectron.atomic_files import atomic_write
from nl_detectron.checkpoint import AtomicCheckpointer
from nl_detectron.errors import CheckpointError

RUN = REFERENCE_RUN


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _assert_only_complete_checkpoints(output_dir: Path) -> None:
    """Every ``*.pth`` loads, and ``last_checkpoint`` names one of them."""
    for path in output_dir.glob("*.pth"):
        torch.load(path, map_location="cpu", weights_only=True)
    tagged = (output_dir / "last_checkpoint").read_text()
    assert (output_dir / tagged).is_file()


def _resume(output_dir: Path) -> subprocess.CompletedProcess:
    proc = train_net("--resume", *RUN, "OUTPUT_DIR", str(output_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_no_traceback(proc)
    return proc


@pytest.mark.slow
def test_kill_during_training_then_resume_ends_like_the_uninterrupted_run(tmp_path):
    reference, _ = cached_run(*RUN)
    output_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_net_command(*RUN, "OUTPUT_DIR", str(output_dir)),
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        tag = output_dir / "last_checkpoint"
        while not (tag.is_file() and tag.read_text() == "model_0000001.pth"):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (output_dir / "model_final.pth").exists()
    _assert_only_complete_checkpoints(output_dir)
    tagged = (output_dir / "last_checkpoint").read_text()

    resumed = _resume(output_dir)
    iteration = int(tagged[len("model_") : -len(".pth")]) + 1
    assert f"Starting training from iteration {iteration}" in resumed.stdout
    _assert_same_weights(output_dir / "model_final.pth", reference / "model_final.pth")


# Runs train_net with torch.save writing half of the second checkpoint, then killing the process
# as kill -9 would: the state a crash in the middle of a checkpoint write leaves behind.
_DIE_WHILE_SAVING = textwrap.dedent(
    """
    import io, os, runpy, signal, sys
    import torch
    real_save, calls = torch.save, []
    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_then_resume(tmp_path):
    reference, _ = cached_run(*RUN)
    output_dir = tmp_path / "run"
    command = [sys.executable, "-c", _DIE_WHILE_SAVING, str(TRAIN_NET)]
    command += train_net_command(*RUN, "OUTPUT_DIR", str(output_dir))[2:]
    proc = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    # The second checkpoint (iteration 3) was cut short in its temporary file: it is neither
    # a model_*.pth nor named by last_checkpoint.
    assert sorted(p.name for p in output_dir.glob("*.pth")) == ["model_0000001.pth"]
    assert (output_dir / "last_checkpoint").read_text() == "model_0000001.pth"
    partial = [p.name for p in output_dir.iterdir() if p.name.startswith(".model_0000003.pth")]
    assert len(partial) == 1 and f"-{socket.gethostname()}-" in partial[0]
    _assert_only_complete_checkpoints(output_dir)

    resumed = _resume(output_dir)
    assert "Starting training from iteration 2" in resumed.stdout
    assert "a checkpoint left half-written by a killed run" in resumed.stdout
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".")]
    _assert_same_weights(output_dir / "model_final.pth", reference / "model_final.pth")


@pytest.mark.parametrize("grouped", [False, True])
def test_a_resumed_loader_continues_with_the_batches_of_the_uninterrupted_one(grouped):
    group_ids = [int(i % 3 == 0) for i in range(10)] if grouped else None
    full = positioned_batches(1, 0, 3, group_ids=group_ids, count=20)
    assert positioned_batches(1, 0, 3, group_ids=group_ids, start=7, count=13) == full[7:]
    if grouped:  # every batch holds one aspect-ratio group only
        assert all(len({group_ids[i] for _, i in batch}) == 1 for batch in full)


# ------------------------------------------------------------------------------------------------
# The checkpointer alone.


def _checkpointer(directory: Path) -> tuple[torch.nn.Module, AtomicCheckpointer]:
    model = torch.nn.Linear(3, 2)
    return model, AtomicCheckpointer(model, str(directory))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last_checkpoint"
    atomic_write(str(path), lambda f: f.write("model_0000001.pth"), mode="w")

    def fail(f):
        f.write("model_00")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(str(path), fail, mode="w")
    assert path.read_text() == "model_0000001.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_resume_skips_a_truncated_checkpoint_for_the_newest_readable_one(tmp_path, caplog):
    model, checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001", iteration=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save("model_0000003", iteration=3)
    # Truncated by something else than the checkpointer (a copy, a disk error).
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:100])

    model, checkpointer = _checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
    assert f"Resuming from {tmp_path / 'model_0000001.pth'}" in caplog.text
    assert "model_0000003.pth is truncated or corrupt" in caplog.text

    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read"):
        _checkpointer(tmp_path)[1].resume_or_load("", resume=True)


def test_temporary_files_of_dead_processes_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".model_0000003.pth.tmp-{host}-{dead}"
    live = tmp_path / f".model_0000005.pth.tmp-{host}-{os.getpid()}"
    other_host = tmp_path / f".model_0000007.pth.tmp-otherhost-{dead}"
    for path in (stale, live, other_host):
        path.write_bytes(b"partial")
    _checkpointer(tmp_path)
    assert not stale.exists()
    assert live.exists() and other_host.exists()


QUICKSTART = REPO / "configs" / "quickstart" / "mask_rcnn_nl_shapes.yaml"
# A smoke run of the demo config, as users shorten it: 30 iterations, a checkpoint every 10.
SHORT_DEMO = ("SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "10", "TEST.EVAL_PERIOD", "0")


@pytest.mark.slow
def test_short_demo_run_killed_then_resumed_ends_with_its_evaluation(tmp_path):
    output_dir = tmp_path / "short"
    command = [sys.executable, str(TRAIN_NET), "--config-file", str(QUICKSTART)]
    opts = [*SHORT_DEMO, "OUTPUT_DIR", str(output_dir)]
    proc = subprocess.Popen(
        [*command, *opts],
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # kill -9 at about iteration 20, right after its checkpoint
        deadline = time.monotonic() + 400
        tag = output_dir / "last_checkpoint"
        while not (tag.is_file() and tag.read_text() == "model_0000019.pth"):
            assert proc.poll() is None, "the run ended before its checkpoint at iteration 20"
            assert time.monotonic() < deadline, "no checkpoint at iteration 20 after 400 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (output_dir / "model_final.pth").exists()

    resumed = subprocess.run(
        [*command, "--resume", *opts], cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_no_traceback(resumed)
    assert "Starting training from iteration 20" in resumed.stdout
    # The final evaluation ran for every task, whatever its AP after 30 iterations.
    for task in ("bbox", "segm", "keypoints"):
        assert f"copypaste: Task: {task}" in resumed.stdout
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    _assert_only_complete_checkpoints(output_dir)
