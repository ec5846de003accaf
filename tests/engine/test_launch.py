"""The multi-process launcher (CPU, gloo): ``tools/train_net.py --num-gpus 2`` against one process
with the same total batch, ``--dist-url`` checks, and user errors in workers."""

from __future__ import annotations

import re
import socket

import pytest
import torch
from training_runs import (
    assert_no_traceback,
    cached_run,
    losses,
    model_weights,
    other_cpu_kernels_envs,
    train_net,
)

from nl_detectron.engine.launch import ReportUserErrors, launch
from nl_detectron.errors import UserInputError

# ------------------------------------------------------------------------------------------------
# tools/train_net.py: two CPU processes against one with the same total batch (4 images).

# Settings under which the per-process loss normalisation equals the whole batch's (see
# docs/distributed.md): every anchor and proposal sampled, no ground truth appended to the
# proposals (so every process has 32 RoIs per image), the keypoint loss normalised per image, no
# mask head (its loss is a mean over each process's RoIs), and no aspect-ratio grouping (so the
# two per-process batches of an iteration form the single-process batch).
EQUIVALENT = (
    *("DATALOADER.ASPECT_RATIO_GROUPING", "False", "MODEL.MASK_ON", "False"),
    *("MODEL.RPN.BATCH_SIZE_PER_IMAGE", "1024", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128"),
    *("MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0", "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False"),
    *("MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS", "False"),
    *("SOLVER.MAX_ITER", "3"),
)


# The rounding unit of float32.
FLOAT32_EPS = torch.finfo(torch.float32).eps
# The two-process run reorders every batch reduction (two partial sums, then the all-reduce);
# a noise-floor run reorders only those its kernels split differently. A correct run stays
# within this many times the floor (measured on AVX2 and AVX-512 machines: within 1.5 times).
NOISE_FACTOR = 10


def _assert_within_rounding(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    floors: list[dict[str, torch.Tensor]],
) -> None:
    """``got`` equals ``want`` up to what float32 rounding produces in this training run.

    Each of ``floors`` is the run of ``want`` with the same arithmetic in another accumulation
    order (:func:`training_runs.other_cpu_kernels_envs`). Their distance from ``want`` measures,
    tensor by tensor, how far rounding alone moves the weights on this machine: little for most
    tensors, but 0.1-0.3 % of the update of the stem, res2 and res3 of the tiny model, where this
    training run amplifies rounding. A tensor may differ by ``NOISE_FACTOR`` times the largest
    of these distances, and always by ``NOISE_FACTOR`` float32 units of the model's typical
    weight (tensors whose exact value is 0, such as the phi biases, which the softmax ignores,
    hold rounding noise only). A broken synchronisation moves tensors by the order of their
    whole update, far beyond both. Float32 units of the tensor's own size allow for another
    algorithm with the same result (SyncBN's variance from all-reduced sums).
    """
    names = [k for k, v in want.items() if v.is_floating_point()]
    assert got.keys() == want.keys()
    for floor in floors:
        assert floor.keys() == want.keys()
        assert any(not torch.equal(want[k], floor[k]) for k in names), (
            "a noise-floor run is bitwise identical to the reference: it measured no rounding"
        )
    sizes = [want[k].numel() for k in names]
    rms = (sum(want[k].double().square().sum().item() for k in names) / sum(sizes)) ** 0.5
    for name, size in zip(names, sizes):
        reference = want[name].double()
        error = (got[name].double() - reference).norm().item()
        noise = max((floor[name].double() - reference).norm().item() for floor in floors)
        resolution = FLOAT32_EPS * max(reference.norm().item(), rms * size**0.5)
        assert error <= NOISE_FACTOR * max(noise, resolution), (name, error, noise, resolution)


@pytest.mark.slow
def test_train_net_with_two_cpu_processes_matches_one_process(tmp_path):
    one, _ = cached_run(*EQUIVALENT)
    floors = [cached_run(*EQUIVALENT, env=env)[0] for env in other_cpu_kernels_envs()]
    two = tmp_path / "two"
    proc = train_net("--num-gpus", "2", "--dist-url", "auto", *EQUIVALENT, "OUTPUT_DIR", str(two))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_no_traceback(proc)
    log = (two / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert re.search(r"all \d+ parameters are identical in the 2 processes", log)

    # The loss terms metrics.json holds (the last iteration's), within the rounding of the
    # noise-floor runs.
    assert losses(two).keys() == losses(one).keys() == {2}
    for term, value in losses(one)[2].items():
        error = abs(losses(two)[2][term] - value)
        noise = max(abs(losses(floor)[2][term] - value) for floor in floors)
        assert error <= NOISE_FACTOR * max(noise, FLOAT32_EPS * abs(value)), (term, error, noise)
    weights_one = model_weights(one / "model_final.pth")
    weights_two = model_weights(two / "model_final.pth")
    floor_weights = [model_weights(floor / "model_final.pth") for floor in floors]
    _assert_within_rounding(weights_two, weights_one, floor_weights)
    # The non-local blocks trained (their norms left zero), and their SyncBN statistics, computed
    # over both processes, are those of the single process's batch (the check above).
    non_local = {k: v for k, v in weights_one.items() if ".non_local_" in k}
    assert any(k.endswith("out_norm.weight") and v.abs().max() > 0 for k, v in non_local.items())


# ------------------------------------------------------------------------------------------------
# launch() arguments and worker errors, without starting processes.


def test_dist_url_auto_is_refused_on_several_machines():
    with pytest.raises(
        UserInputError, match=r"--dist-url auto .* only works with --num-machines 1"
    ):
        launch(print, 2, num_machines=2, machine_rank=0, dist_url="auto", backend="gloo")


def test_busy_local_port_is_refused_with_the_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        url = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(UserInputError, match=rf"--dist-url {url}: port \d+ is in use.*auto"):
            launch(print, 2, dist_url=url, backend="gloo")


def _fails() -> None:
    raise UserInputError("Image x.png cannot be read.")


def test_a_user_error_in_a_worker_is_printed_without_traceback(capsys):
    with pytest.raises(SystemExit) as info:
        ReportUserErrors(_fails)()
    assert info.value.code == 1
    assert capsys.readouterr().err == "error (process 0 of 1): Image x.png cannot be read.\n"
