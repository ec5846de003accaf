"""Cheap checks before a run starts: datasets on disk, weights reachable, config consistent.

Without them, a missing COCO or an offline weights download surfaces as a traceback minutes into
a run (after the model is built, or after training when the test set is first loaded). Every
problem found is reported at once, each with the paths or URL looked at and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from .data import CONTEXT_SPLITS, MARKS_SPLITS, SHAPES_SPLITS
from .device import amp_dtype
from .errors import UserInputError

__all__ = ["check_inputs", "check_lazy_inputs"]

# MODEL.NONLOCAL.OPTIMIZER's values (nl_detectron.engine.Trainer.build_optimizer)
NON_LOCAL_OPTIMIZERS = ("SGD", "AdamW")

# Metadata keys that builtin detectron2 datasets use for files and directories on disk.
_PATH_KEYS = (
    "json_file",
    "image_root",
    "dirname",
    "panoptic_json",
    "panoptic_root",
    "sem_seg_root",
    "gt_dir",
)
# Datasets generated on first use: nothing needs to exist beforehand.
_GENERATED_DATASETS = frozenset(
    split.name for split in (*SHAPES_SPLITS, *CONTEXT_SPLITS, *MARKS_SPLITS)
)
_QUICKSTART = "configs/quickstart/mask_rcnn_nl_shapes.yaml"


def check_inputs(
    cfg: CfgNode, *, eval_only: bool = False, resume: bool = False, num_gpus: int = 1
) -> None:
    """Check that a run of ``cfg`` can start; does not download datasets or train anything.

    Checks the device, the datasets (``DATASETS.TEST`` and, unless ``eval_only``,
    ``DATASETS.TRAIN``: registered, files on disk), the weights that will be loaded (the last
    checkpoint when resuming, else ``MODEL.WEIGHTS``: a local file, or a URL fetched into the
    local cache now) and the keypoint settings.

    Raises:
        UserInputError: listing every problem found, each with its fix.
    """
    uses = [] if eval_only else [(name, "DATASETS.TRAIN") for name in cfg.DATASETS.TRAIN]
    uses += [(name, "DATASETS.TEST") for name in cfg.DATASETS.TEST]
    _raise_problems(
        [
            *_device_problems(
                cfg.MODEL.DEVICE,
                cfg.SOLVER.AMP.ENABLED,
                cfg.SOLVER.AMP.PRECISION,
                num_gpus,
                YACS_KEYS,
            ),
            *_dataset_problems(uses),
            *_weights_problems(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, eval_only, resume, YACS_KEYS),
            *_keypoint_problems(cfg),
            *_schedule_problems(cfg),
            *_optimizer_problems(cfg),
            *_box_feature_problems(cfg),
        ]
    )


def check_lazy_inputs(
    cfg: Any, *, eval_only: bool = False, resume: bool = False, num_gpus: int = 1
) -> None:
    """:func:`check_inputs` for a Python (LazyConfig) config: ``train.device``,
    ``train.amp.enabled``, the datasets of ``dataloader.{train,test}.dataset.names``, and
    ``train.init_checkpoint`` (or the last checkpoint when resuming)."""
    uses = []
    for part in ("train", "test"):
        if eval_only and part == "train":
            continue
        names = _lazy_get(cfg, f"dataloader.{part}.dataset.names")
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            uses += [(name, f"dataloader.{part}.dataset.names") for name in names]
    train = cfg.train
    _raise_problems(
        [
            *_device_problems(
                train.device,
                bool(train.amp.enabled),
                train.amp.get("precision", "float16"),
                num_gpus,
                LAZY_KEYS,
            ),
            *_dataset_problems(uses),
            *_weights_problems(
                train.init_checkpoint, train.output_dir, eval_only, resume, LAZY_KEYS
            ),
        ]
    )


def _lazy_get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


# The config keys the messages name, for each config system.
YACS_KEYS = {
    "device": "MODEL.DEVICE",
    "amp": "SOLVER.AMP.ENABLED",
    "precision": "SOLVER.AMP.PRECISION",
    "weights": "MODEL.WEIGHTS",
    "output_dir": "OUTPUT_DIR",
}
LAZY_KEYS = {
    "device": "train.device",
    "amp": "train.amp.enabled",
    "precision": "train.amp.precision",
    "weights": "train.init_checkpoint",
    "output_dir": "train.output_dir",
}


def _raise_problems(problems: list[str]) -> None:
    if problems:
        if len(problems) == 1:
            raise UserInputError(problems[0])
        listed = "\n".join(f"{i}. {p}" for i, p in enumerate(problems, 1))
        raise UserInputError(f"{len(problems)} problems stop this run:\n{listed}")


def _device_problems(
    device: str, amp: bool, precision: str, num_gpus: int, keys: dict[str, str]
) -> Iterable[str]:
    cuda = torch.cuda.is_available()
    dev = keys["device"]
    if device.startswith("cuda") and not cuda:
        yield (
            f"{dev} is {device!r}, but PyTorch sees no CUDA GPU on this machine. "
            f"Add `{dev} cpu` to the command line (much slower) or run on a GPU machine."
        )
    if amp:
        try:
            dtype = amp_dtype(precision, keys["precision"])
        except UserInputError as e:
            yield str(e)
            dtype = None
        if dtype == torch.float16 and not device.startswith("cuda"):
            yield (
                f"{keys['amp']} is True with {keys['precision']} float16 and {dev} {device!r}: "
                "float16 autocast is for GPUs. Set "
                f"{keys['precision']} bfloat16 to train in mixed precision on the CPU, or "
                f"{keys['amp']} False."
            )
        if dtype == torch.bfloat16 and device.startswith("cuda") and cuda:
            if not torch.cuda.is_bf16_supported():
                yield (
                    f"{keys['precision']} is bfloat16, but this GPU "
                    f"({torch.cuda.get_device_name()}) has no bfloat16 support (it needs Ampere "
                    f"or newer). Set {keys['precision']} float16."
                )
    # On CPU (device cpu), --num-gpus is the number of processes (gloo): any number works.
    gpus = torch.cuda.device_count() if cuda else 0
    if device.startswith("cuda") and num_gpus > 1 and num_gpus > gpus:
        yield (
            f"--num-gpus {num_gpus} starts one process per GPU, but this machine has "
            f"{gpus} CUDA GPU(s). Use at most the number of GPUs, or `{dev} cpu` to "
            f"train in {num_gpus} CPU processes."
        )


def _datasets_root() -> str:
    return os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def _dataset_problems(uses: list[tuple[str, str]]) -> Iterable[str]:
    """``uses``: ``(dataset name, the config key that names it)``."""
    registered = DatasetCatalog.list()
    missing: dict[tuple[str, str], list[str]] = {}
    for name, key in _unique(uses):
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            yield (
                f"Dataset {name!r} ({key}) is not registered.{hint} Register it in code "
                "(detectron2.data.datasets.register_coco_instances) or use a registered name, "
                f"e.g. 'coco_2017_train' or the bundled 'nl_shapes_train' / 'nl_shapes_val'."
            )
            continue
        if name in _GENERATED_DATASETS:
            continue
        metadata = MetadataCatalog.get(name)
        paths = [
            os.path.abspath(getattr(metadata, k))
            for k in _PATH_KEYS
            if hasattr(metadata, k) and not os.path.exists(getattr(metadata, k))
        ]
        if paths:
            missing[(name, key)] = paths
    if missing:
        yield _missing_datasets_message(missing)


def _unique(uses: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(dataset, config key)`` pairs, each dataset once (first use)."""
    seen: set[str] = set()
    return [(n, k) for n, k in uses if not (n in seen or seen.add(n))]


def _missing_datasets_message(missing: dict[tuple[str, str], list[str]]) -> str:
    names = " and ".join(repr(name) for name, _ in missing)
    noun = "Dataset" if len(missing) == 1 else "Datasets"
    lines = [f"{noun} {names} not found on disk; looked for:"]
    for (name, key), paths in missing.items():
        lines += [f"     {p}    ({name}, {key})" for p in paths]
    root = _datasets_root()
    all_paths = [p for paths in missing.values() for p in paths]
    if all(os.path.commonpath([root, p]) == root for p in all_paths):
        env = os.getenv("DETECTRON2_DATASETS")
        where = f"DETECTRON2_DATASETS={env}" if env else "DETECTRON2_DATASETS is unset: ./datasets"
        advice = f"   detectron2 looks for its builtin datasets under {root} ({where}). "
        if all(name.startswith(("coco_", "keypoints_coco_")) for name, _ in missing):
            advice += (
                f"Download COCO 2017 from https://cocodataset.org/#download (train2017/, "
                f"val2017/ and annotations/) into {os.path.join(root, 'coco')}, or set "
                "DETECTRON2_DATASETS to the directory that contains coco/."
            )
        else:
            advice += (
                "Put the datasets there as detectron2's datasets/README.md describes, or set "
                "DETECTRON2_DATASETS to the directory that contains them."
            )
    else:
        advice = "   Create these files or register the datasets with the right paths."
    lines.append(advice + f" To try nl_detectron without them: --config-file {_QUICKSTART}.")
    return "\n".join(lines)


def _resolved_url(weights: str) -> str:
    """The http(s) URL behind a ``detectron2://`` or ``catalog://`` path."""
    if weights.startswith("catalog://"):
        from detectron2.checkpoint.catalog import ModelCatalog

        try:
            weights = ModelCatalog.get(weights[len("catalog://") :])
        except (KeyError, RuntimeError):
            return weights
    if weights.startswith("detectron2://"):
        from detectron2.utils.file_io import Detectron2Handler

        return Detectron2Handler.S3_DETECTRON2_PREFIX + weights[len("detectron2://") :]
    return weights


def _cache_path(url: str) -> str:
    """Where iopath's HTTP handler caches ``url``."""
    from iopath.common.file_io import get_cache_dir

    parsed = urlparse(url)
    return os.path.join(
        get_cache_dir(), os.path.dirname(parsed.path.lstrip("/")), url.split("/")[-1]
    )


def _weights_problems(
    weights: str, output_dir: str, eval_only: bool, resume: bool, keys: dict[str, str]
) -> Iterable[str]:
    key = keys["weights"]
    last_checkpoint = os.path.join(output_dir, "last_checkpoint")
    if resume and os.path.isfile(last_checkpoint):
        with open(last_checkpoint, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            yield (
                f"--resume: {last_checkpoint} names checkpoint {name!r}, which does not exist "
                f"({os.path.abspath(path)}). Fix or delete {last_checkpoint}, or run without "
                "--resume."
            )
        return
    if not weights:
        if eval_only:
            yield (
                f"--eval-only needs trained weights, but {key} is empty. Add "
                f"`{key} /path/to/model_final.pth` (or --resume to evaluate the last "
                f"checkpoint in {keys['output_dir']})."
            )
        return
    if "://" not in weights:
        file = weights.split("?", 1)[0]  # Detectron2 main's ?matching_heuristics=True
        if not os.path.isfile(file):
            yield (
                f"{key} {weights!r} does not exist (looked at {os.path.abspath(file)}). "
                f"Pass an existing file, a URL, or `{key} ''` to train from scratch."
            )
        return
    import detectron2.checkpoint  # noqa: F401  (registers the catalog:// handler)
    from detectron2.utils.file_io import PathManager

    url = _resolved_url(weights)
    if not os.path.isfile(_cache_path(url)):
        print(f"Downloading {key} {url} into {_cache_path(url)} ...", file=sys.stderr)
    try:
        # iopath's own progress bar and failure log would only repeat the problem below.
        with _quiet_download():
            PathManager.get_local_path(weights)
    except Exception as e:  # noqa: BLE001  (any failure to fetch means the same fix)
        via = f" ({url})" if url != weights else ""
        yield (
            f"Could not get {key} {weights}{via}: {type(e).__name__}: {e}. "
            f"It is downloaded once into {_cache_path(url)} ($FVCORE_CACHE, default "
            "~/.torch/iopath_cache). Download the file on a machine with internet access, copy "
            f"it here, and pass `{key} /local/path/{url.split('/')[-1]}` (or put it at "
            "that cache path)."
        )


@contextlib.contextmanager
def _quiet_download() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("iopath", "iopath.common.download")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _schedule_problems(cfg: CfgNode) -> Iterable[str]:
    """The learning-rate schedule Detectron2 builds only once the model and data are loaded."""
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return
    # Detectron2 drops the steps beyond MAX_ITER (with a warning) and needs the others
    # strictly increasing, or fails with fvcore's "Milestone must be smaller than start epoch".
    steps = [s for s in solver.STEPS if s <= solver.MAX_ITER]
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(s <= 0 for s in steps):
        yield (
            f"SOLVER.STEPS is {tuple(solver.STEPS)}: the iterations at which the learning rate "
            f"drops must be positive and strictly increasing (and below SOLVER.MAX_ITER "
            f'{solver.MAX_ITER}), e.g. SOLVER.STEPS "({int(solver.MAX_ITER * 0.75)}, '
            f'{int(solver.MAX_ITER * 0.9)})".'
        )


def _optimizer_problems(cfg: CfgNode) -> Iterable[str]:
    """The NL blocks' update rule, read only once the model is built."""
    node = cfg.MODEL.get("NONLOCAL")
    name = node.get("OPTIMIZER", "SGD") if node is not None else "SGD"
    if name not in NON_LOCAL_OPTIMIZERS:
        yield (
            f"MODEL.NONLOCAL.OPTIMIZER is {name!r}: the NL blocks' parameters are updated by "
            f"one of {', '.join(map(repr, NON_LOCAL_OPTIMIZERS))}, e.g. "
            f'MODEL.NONLOCAL.OPTIMIZER "SGD" (the detector\'s own).'
        )


def _box_feature_problems(cfg: CfgNode) -> Iterable[str]:
    """Blocks on the box branch's features are built only by their RoI heads."""
    node = cfg.MODEL.get("NONLOCAL")
    levels = list(node.get("BOX_FEATURE_POSITIONS", [])) if node is not None else []
    name = cfg.MODEL.ROI_HEADS.NAME
    if levels and name != "NonLocalBoxFeatureROIHeads":
        yield (
            f"MODEL.NONLOCAL.BOX_FEATURE_POSITIONS is {levels}, but MODEL.ROI_HEADS.NAME is "
            f"{name!r}, which builds no block there: set MODEL.ROI_HEADS.NAME "
            f'"NonLocalBoxFeatureROIHeads", or MODEL.NONLOCAL.BOX_FEATURE_POSITIONS "[]".'
        )


def _keypoint_problems(cfg: CfgNode) -> Iterable[str]:
    if not cfg.MODEL.KEYPOINT_ON:
        return
    num_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    sigmas = list(cfg.TEST.KEYPOINT_OKS_SIGMAS)
    if sigmas and len(sigmas) != num_keypoints:
        yield (
            f"TEST.KEYPOINT_OKS_SIGMAS has {len(sigmas)} values, but MODEL.ROI_KEYPOINT_HEAD."
            f"NUM_KEYPOINTS is {num_keypoints}: give one sigma per keypoint."
        )
    elif not sigmas and num_keypoints != 17:
        yield (
            f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS is {num_keypoints}, but "
            "TEST.KEYPOINT_OKS_SIGMAS is empty, which means COCO's 17 person-keypoint sigmas: "
            f"set TEST.KEYPOINT_OKS_SIGMAS to {num_keypoints} values for keypoint AP."
        )
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        if name not in DatasetCatalog.list():
            continue  # reported by the dataset checks
        names = MetadataCatalog.get(name).get("keypoint_names")
        if names is not None and len(names) != num_keypoints:
            yield (
                f"Dataset {name!r} has {len(names)} keypoints, but "
                f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS is {num_keypoints}. Set it to "
                f"{len(names)}."
            )
