"""Checkpoints that a crash, a ``kill -9`` or a full disk can never leave half-written.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` in place and then rewrites
``last_checkpoint`` in place: a run killed during either write leaves a truncated checkpoint, or a
``last_checkpoint`` that is empty or names a truncated file, and ``--resume`` then fails or, worse,
resumes from garbage. :class:`AtomicCheckpointer` writes each file to a temporary file in the same
directory, flushes it to disk (``fsync``) and renames it into place (``os.replace``, atomic on
POSIX), and tags ``last_checkpoint`` the same way only after the checkpoint itself is in place
(:mod:`nl_detectron.atomic_files`).
So at every instant ``last_checkpoint`` names a complete checkpoint (or does not exist), and a
kill leaves at most a hidden temporary file, which is never read and is removed by the next run.

It also refuses to save weights that are NaN or infinite (the training diverged), so the last
good checkpoint stays the one ``--resume`` uses, and when resuming it falls back to the newest
readable checkpoint if the one ``last_checkpoint`` names cannot be read (e.g. copied truncated).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn

from ..atomic_files import atomic_write, remove_stale_temp
from ..errors import CheckpointError, TrainingDivergedError
from .loading import NonLocalCheckpointer

__all__ = ["AtomicCheckpointer"]

logger = logging.getLogger(__name__)

# Checkpoints written by PeriodicCheckpointer, "model_0004999.pth" (any prefix).
_PERIODIC = re.compile(r"^(?P<prefix>.+)_(?P<iteration>\d{7})\.pth$")


def _non_finite_tensors(state: dict[str, Any]) -> list[str]:
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


class _UnreadableCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read (raised before anything is loaded from it)."""


class AtomicCheckpointer(NonLocalCheckpointer):
    """:class:`~nl_detectron.checkpoint.NonLocalCheckpointer` (loading with a report) whose
    saves are atomic and durable; see the module docstring.

    Saving to a local ``save_dir`` is atomic; other locations (``s3://`` ... handled by
    ``PathManager``) are written as fvcore writes them.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", **kwargs: Any) -> None:
        super().__init__(model, save_dir, **kwargs)
        if self.save_to_disk and self._local():
            for path in remove_stale_temp(self.save_dir):
                logger.info(f"Removed {path}, a checkpoint left half-written by a killed run.")

    def _local(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``save_dir/name.pth`` (model, checkpointables, ``kwargs``) atomically, then tag
        it in ``last_checkpoint``.

        Raises:
            TrainingDivergedError: the model's weights or buffers are not all finite; nothing is
                written and ``last_checkpoint`` still names the previous checkpoint.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._local():
            super().save(name, **kwargs)
            return
        data = {"model": self.model.state_dict()}
        bad = _non_finite_tensors(data["model"])
        if bad:
            previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
            kept = f"{previous} is kept" if previous else "no checkpoint had been written yet"
            after = f" after iteration {kwargs['iteration']}" if "iteration" in kwargs else ""
            raise TrainingDivergedError(
                f"Not saving checkpoint {name}.pth{after}: {len(bad)} weight tensor(s) of the "
                f"model are NaN or infinite (first: {bad[0]}), so the training has diverged; "
                f"{kept}. "
                "Likely causes: a learning rate too high for the batch size (lower "
                "SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS), bad annotations, or a float16 "
                "overflow with SOLVER.AMP.ENABLED."
            )
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        if not self._local():
            super().tag_last_checkpoint(last_filename_basename)
            return
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """As fvcore's: with ``resume`` and a ``last_checkpoint``, load that checkpoint with all
        checkpointables; else load ``path``'s model weights only.

        When resuming, a checkpoint that cannot be read (truncated, corrupt) is not used: the
        newest periodic checkpoint that can be read is, with a warning.

        Raises:
            CheckpointError: resuming, and no checkpoint in ``save_dir`` can be read.
        """
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tagged = self.get_checkpoint_file()
        candidates = [tagged] + [c for c in self._periodic_checkpoints() if c != tagged]
        errors = []
        for candidate in candidates:
            if not os.path.isfile(candidate):
                errors.append(f"{candidate}: does not exist")
                continue
            try:
                checkpoint = self.load(candidate)
            except _UnreadableCheckpoint as e:  # nothing was restored from it
                errors.append(str(e))
                continue
            if candidate != tagged:
                logger.warning(
                    f"Resuming from {candidate}, the newest readable checkpoint in "
                    f"{self.save_dir}: {errors[0]}"
                )
            return checkpoint
        listed = "\n".join(f"  - {e}" for e in errors)
        raise CheckpointError(
            f"--resume: no checkpoint in {self.save_dir} can be read:\n{listed}\nRemove "
            f"{os.path.join(self.save_dir, 'last_checkpoint')} to start from MODEL.WEIGHTS, or "
            "run without --resume."
        )

    def _load_file(self, filename: str) -> dict[str, Any]:
        try:
            return super()._load_file(filename)
        except CheckpointError as e:
            raise _UnreadableCheckpoint(str(e)) from None

    def _periodic_checkpoints(self) -> list[str]:
        """``save_dir``'s periodic checkpoints (``<prefix>_<7 digits>.pth``), newest first."""
        if not self._local() or not os.path.isdir(self.save_dir):
            return []
        found = []
        for name in os.listdir(self.save_dir):
            match = _PERIODIC.match(name)
            if match:
                found.append((int(match.group("iteration")), os.path.join(self.save_dir, name)))
        return [path for _, path in sorted(found, reverse=True)]
