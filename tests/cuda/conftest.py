"""The device of the ``cuda`` tests: CUDA, skipped where there is none, or what
``NL_DETECTRON_CUDA_TEST_DEVICE`` names (``tools/gpu_check.py --dry-run`` sets ``cpu``, so that the
tests run, at small sizes, on every machine and cannot rot)."""

import os

import pytest
import torch

DEVICE_VARIABLE = "NL_DETECTRON_CUDA_TEST_DEVICE"


@pytest.fixture(scope="session")
def device() -> str:
    name = os.environ.get(DEVICE_VARIABLE, "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU (set {DEVICE_VARIABLE}=cpu to run the GPU tests on the CPU)")
    return name


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.startswith("cuda")
