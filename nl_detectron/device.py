"""Where a run computes and in what precision: the ``auto`` device of the bundled configs and the
mixed-precision dtypes of ``SOLVER.AMP.PRECISION`` / ``train.amp.precision``."""

from __future__ import annotations

import torch

from .errors import UserInputError

__all__ = ["AMP_PRECISIONS", "AUTO", "amp_dtype", "default_device", "describe_device"]

# MODEL.DEVICE of the bundled quickstart and context configs: CUDA when there is a GPU, else the
# CPU. Any other value (an explicit "cpu", "cuda", "cuda:1") is used as it is.
AUTO = "auto"

# The autocast dtypes of mixed-precision training. float16 needs loss scaling (GradScaler);
# bfloat16 has float32's range and needs none (Ampere and newer GPUs).
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    """``"cuda"`` when PyTorch sees a CUDA GPU, else ``"cpu"``: what ``auto`` means."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: str) -> str:
    """One line for the log: the device a run uses, and the GPU's name on CUDA."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        name = torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)
        return f"Device: {device} ({name}, {torch.cuda.device_count()} visible)"
    if device == "cpu":
        gpu = "no CUDA GPU visible" if not torch.cuda.is_available() else "CUDA GPU not used"
        return f"Device: cpu ({gpu})"
    return f"Device: {device}"


def amp_dtype(name: str, key: str) -> torch.dtype:
    """The autocast dtype named ``name`` by the config key ``key``.

    Raises:
        UserInputError: ``name`` is not one of :data:`AMP_PRECISIONS`.
    """
    if name not in AMP_PRECISIONS:
        raise UserInputError(
            f"{key} is {name!r}; valid values are {', '.join(map(repr, AMP_PRECISIONS))} "
            "(bfloat16 on Ampere or newer GPUs needs no loss scaling)."
        )
    return AMP_PRECISIONS[name]
