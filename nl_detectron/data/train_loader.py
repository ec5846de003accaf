"""A training data loader that is reproducible and resumes where the interrupted run was.

Detectron2's training loader draws the same infinite, seeded index sequence in every run, but:

- a resumed run starts that sequence from the beginning again, so after ``--resume`` the model
  sees other images than the uninterrupted run would have;
- the random augmentations use the global RNGs of whichever process maps the image (the main
  process or a data-loader worker), so they depend on ``NUM_WORKERS`` and on everything else
  that draws random numbers.

:class:`ResumableTrainLoader` yields the same batches in the same order (same sampler, same
sharding across processes, same aspect-ratio grouping, same mapper) with two changes: it can
start at batch ``start_batch`` (the resumed iteration) without loading the batches before it, and
each image is mapped with the RNGs seeded from ``(seed, its position in the global sample
sequence)``, so its augmentation does not depend on the number of workers or processes, nor on
when it is loaded. :class:`ReseedEachIteration` does the same for the model's own randomness
(proposal sampling): with ``SEED >= 0`` every iteration starts from RNGs seeded by
``(SEED, rank, iteration)``. Together they make a CPU run with a fixed seed repeat exactly, and a
resumed run continue exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import HookBase
from detectron2.utils import comm
from PIL import Image

from ..errors import UserInputError
from .checks import CheckedDatasetMapper, load_train_dicts

__all__ = [
    "PositionedBatches",
    "ReseedEachIteration",
    "ResumableTrainLoader",
    "build_train_loader",
    "derived_seed",
    "seeded_rngs",
]

logger = logging.getLogger(__name__)


def derived_seed(*keys: int) -> int:
    """A 32-bit seed derived from integers (e.g. ``(seed, position)``), well mixed."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's (CPU) global RNGs for the block, then restore them."""
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # CPU only: its state is restored below
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class _SeededMapping(torchdata.Dataset):
    """``dataset[index]`` mapped with the RNGs seeded by ``(seed, position)``; items are
    ``(position, index)`` pairs."""

    def __init__(self, dataset: Sequence[dict], mapper: Callable[[dict], Any], seed: int) -> None:
        self.dataset = dataset
        self.mapper = mapper
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        position, index = item
        seed = derived_seed(self.seed, position)
        retry = random.Random(seed)
        for attempt in range(100):
            with seeded_rngs(derived_seed(seed, attempt)):
                data = self.mapper(self.dataset[index])
            if data is not None:
                return data
            # As Detectron2's MapDataset: a mapper may drop an image; take another one instead.
            if attempt == 2:
                logger.warning(f"The mapper dropped image {index} and {attempt} replacements.")
            index = retry.randrange(len(self.dataset))
        raise UserInputError(
            "The data mapper returned None for 100 images in a row: it drops every image. "
            "Check the dataset and the mapper's conditions."
        )


def _group_ids(dataset_dicts: Sequence[dict]) -> list[int]:
    """Detectron2's aspect-ratio buckets: 0 for images wider than tall, 1 for the others."""
    ids = []
    for record in dataset_dicts:
        if "width" in record and "height" in record:
            w, h = record["width"], record["height"]
        else:  # read the size from the image header
            with Image.open(record["file_name"]) as image:
                w, h = image.size
        ids.append(0 if w > h else 1)
    return ids


class PositionedBatches:
    """Batches of ``(position, index)``: the sampler's indices of this process (``position`` is
    the index's place in the sequence of all processes), grouped by aspect ratio as Detectron2's
    ``AspectRatioGroupedDataset`` groups them, from batch ``start`` on."""

    def __init__(
        self,
        sampler: torchdata.Sampler,
        batch_size: int,
        group_ids: Optional[list[int]],
        start: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.group_ids = group_ids
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buckets: list[list[tuple[int, int]]] = [[], []]
        done = 0
        for k, index in enumerate(self.sampler):
            # The samplers give process r the elements r, r + W, r + 2W, ... of one sequence.
            item = (k * self.world_size + self.rank, int(index))
            bucket = buckets[self.group_ids[index] if self.group_ids is not None else 0]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                if done >= self.start:
                    yield list(bucket)
                done += 1
                bucket.clear()


def _trivial_batch(batch: list) -> list:
    return batch


class ResumableTrainLoader:
    """An infinite iterable of training batches (lists of mapped dicts), as Detectron2's
    ``build_detection_train_loader`` returns; see the module docstring.

    Args:
        dataset_dicts: the training records (Detectron2's dataset format).
        mapper: maps a record to the model's input (e.g. ``DatasetMapper(cfg, True)``).
        sampler_name, repeat_threshold, random_subset_ratio: ``cfg.DATALOADER.SAMPLER_TRAIN``
            and its options.
        total_batch_size: images per iteration over all processes (``SOLVER.IMS_PER_BATCH``).
        aspect_ratio_grouping, num_workers: as in Detectron2.
        seed: seed of the index sequence and of the augmentations; None: a random one shared by
            all processes.

    Attributes:
        start_batch: the batch to start at (the iteration a resumed run starts from). Set it
            before iterating; each ``iter()`` starts there.
    """

    def __init__(
        self,
        dataset_dicts: Sequence[dict],
        mapper: Callable[[dict], Any],
        *,
        sampler_name: str = "TrainingSampler",
        repeat_threshold: float = 0.0,
        random_subset_ratio: float = 1.0,
        total_batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        seed: Optional[int] = None,
    ) -> None:
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size:
            raise UserInputError(
                f"SOLVER.IMS_PER_BATCH {total_batch_size} must be a positive multiple of the "
                f"number of processes ({world_size}): each process takes an equal share."
            )
        if seed is None:
            seed = comm.shared_random_seed()
        self.seed = int(seed)
        self.batch_size = total_batch_size // world_size
        self.num_workers = num_workers
        self.start_batch = 0
        self._group_ids = _group_ids(dataset_dicts) if aspect_ratio_grouping else None
        self._sampler = _make_sampler(
            dataset_dicts, sampler_name, repeat_threshold, random_subset_ratio, self.seed
        )
        self._dataset = _SeededMapping(
            DatasetFromList(list(dataset_dicts), copy=False), mapper, self.seed
        )

    def __iter__(self) -> Iterator[list]:
        batches = PositionedBatches(
            self._sampler,
            self.batch_size,
            self._group_ids,
            self.start_batch,
            comm.get_rank(),
            comm.get_world_size(),
        )
        # Its own generator: starting an iterator draws a seed from it, which would otherwise
        # come from the global RNG and shift the model's random numbers at that iteration.
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        loader = torchdata.DataLoader(
            self._dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=_trivial_batch,
            generator=generator,
        )
        yield from loader


def build_train_loader(cfg: CfgNode) -> ResumableTrainLoader:
    """The training loader of ``cfg``: the records of ``DATASETS.TRAIN`` (checked by
    :func:`~nl_detectron.data.checks.load_train_dicts`), Detectron2's ``DatasetMapper``
    (reporting unusable images), the sampler of ``DATALOADER.SAMPLER_TRAIN``, seeded by ``SEED``
    (a random seed shared by all processes if it is negative)."""
    return ResumableTrainLoader(
        load_train_dicts(cfg),
        CheckedDatasetMapper(cfg, True),
        sampler_name=cfg.DATALOADER.SAMPLER_TRAIN,
        repeat_threshold=cfg.DATALOADER.REPEAT_THRESHOLD,
        random_subset_ratio=cfg.DATALOADER.get("RANDOM_SUBSET_RATIO", 1.0),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=cfg.SEED if cfg.SEED >= 0 else None,
    )


def _make_sampler(
    dataset_dicts: Sequence[dict],
    name: str,
    repeat_threshold: float,
    subset_ratio: float,
    seed: int,
) -> torchdata.Sampler:
    """The sampler Detectron2's ``_train_loader_from_config`` builds, with an explicit seed."""
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, repeat_threshold
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(
            len(dataset_dicts), subset_ratio, seed_shuffle=seed, seed_subset=seed
        )
    raise UserInputError(
        f"Unknown DATALOADER.SAMPLER_TRAIN {name!r}; use 'TrainingSampler', "
        "'RepeatFactorTrainingSampler' or 'RandomSubsetTrainingSampler'."
    )


class ReseedEachIteration(HookBase):
    """Before every iteration, seed Python's, NumPy's and torch's RNGs (CPU and CUDA) from
    ``(seed, rank, iteration)``, so that the model's random choices (proposal and RoI sampling)
    at iteration i do not depend on what ran before: not on the iterations a resumed run did not
    repeat, nor on evaluation or checkpointing in between."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def before_step(self) -> None:
        seed = derived_seed(self.seed, comm.get_rank(), self.trainer.iter)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
