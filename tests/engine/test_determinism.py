"""With a fixed SEED, CPU training is reproducible: the same losses and bitwise the same weights,
whatever DATALOADER.NUM_WORKERS is."""

from __future__ import annotations

import pytest
import torch
from training_runs import REFERENCE_RUN, cached_run, losses, model_weights


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_identical_whatever_the_number_of_workers():
    reference, _ = cached_run(*REFERENCE_RUN)
    with_workers, _ = cached_run(*REFERENCE_RUN, "DATALOADER.NUM_WORKERS", "2")
    assert losses(with_workers) == losses(reference)
    a, b = (
        model_weights(reference / "model_final.pth"),
        model_weights(with_workers / "model_final.pth"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
