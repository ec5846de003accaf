"""Loading checkpoints into models with non-local blocks, with a report of what was loaded.

A model with NL blocks has every parameter of its vanilla counterpart under the same name, plus
the blocks (:mod:`nl_detectron.modeling`). Loading a
vanilla checkpoint must therefore fill everything but the blocks, which start as identities
(zero-initialised norm, paper Sec. 4.1), so the loaded model predicts exactly what the vanilla
one did. Detectron2 loads with ``strict=False`` and only logs what did not fit, so a wrong file
(a ResNet-101 checkpoint for a ResNet-50 config, another dataset's class count) still "loads".
:class:`NonLocalCheckpointer` sorts every key that did not load into what is expected (new NL
blocks; the detector layers an ImageNet checkpoint does not have) and what is not, logs the
latter under a banner, and refuses to resume training from another model's checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qs

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from ..compat import CHECKPOINTER_TAKES_URL_QUERIES, reset_checkpointer_after_failed_load
from ..errors import CheckpointError
from ..layers import non_local_blocks

__all__ = ["CheckpointError", "LoadReport", "NonLocalCheckpointer"]

logger = logging.getLogger(__name__)

# A tensor of a ResNet stage or stem, wherever the model nests the ResNet
# ("backbone.bottom_up.res4.5.conv1.weight", "roi_heads.res5.0.conv1.weight" in C4).
_RESNET_KEY = re.compile(r"(?:^|\.)(?:stem|res[2-5])\.")
# Caffe2 ImageNet ResNets have a bias in the stem conv, which Detectron2's stem does not use.
_UNUSED_IMAGENET_KEYS = frozenset({"stem.conv1.bias"})
_BANNER = "=" * 100
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTO = b"\x80"  # pickle protocol >= 2: .pkl files and pre-1.6 torch.save files


@dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did to a model's parameters and buffers.

    Attributes:
        path: the checkpoint as given (file or URL).
        source: the checkpoint's format, e.g. ``"Detectron2 checkpoint"``.
        num_tensors: number of tensors in the model's state dict.
        num_loaded: how many of them were loaded from the checkpoint.
        new_non_local: NL block name -> its tensors (relative names) that the checkpoint does not
            have; they keep their init, under which the block is an identity.
        from_scratch: layers outside the ResNet that a backbone-only (ImageNet) checkpoint does
            not have: expected, they are trained from their init.
        missing: any other model tensor the checkpoint does not have: it keeps its random init.
        unexpected: checkpoint tensors the model has no place for: skipped.
        ignored: tensors of an ImageNet checkpoint that no detector uses (its classifier):
            skipped, as expected.
        incorrect_shapes: ``(name, shape in the checkpoint, shape in the model)`` of tensors
            skipped because of their shape.
    """

    path: str
    source: str
    num_tensors: int
    num_loaded: int
    new_non_local: dict[str, list[str]] = field(default_factory=dict)
    from_scratch: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    incorrect_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )

    @property
    def has_problems(self) -> bool:
        """Whether some tensor did not load that should have (the banner's content)."""
        return bool(self.missing or self.unexpected or self.incorrect_shapes)

    def summary(self) -> str:
        """A readable account of the load: counts, new NL blocks, layers trained from scratch."""
        lines = [
            f"Loaded {self.num_loaded} of the model's {self.num_tensors} parameters and buffers "
            f"from {self.path} ({self.source})."
        ]
        if self.new_non_local:
            count = sum(len(v) for v in self.new_non_local.values())
            lines.append(
                f"Newly initialised: {count} tensors of {len(self.new_non_local)} non-local "
                "block(s), identities until trained:"
            )
            lines += [
                f"  {block}: {len(names)} tensors of "
                f"{', '.join(sorted({n.split('.')[0] for n in names}))}"
                for block, names in self.new_non_local.items()
            ]
        if self.from_scratch:
            lines.append(
                f"Not in this backbone checkpoint, trained from their init: "
                f"{len(self.from_scratch)} tensors of {', '.join(_modules(self.from_scratch))}."
            )
        if self.ignored:
            lines.append(f"Unused ImageNet tensors (skipped): {', '.join(_group(self.ignored))}.")
        if self.has_problems:
            lines.append("Some tensors did not load: see the warning.")
        return "\n".join(lines)

    def warning(self) -> str:
        """The banner listing every tensor that did not load but should have; "" if none."""
        if not self.has_problems:
            return ""
        lines = [_BANNER, f"CHECKPOINT MISMATCH: {self.path} does not fully fit this model."]
        if self.missing:
            lines.append(
                f"{len(self.missing)} model parameters/buffers are NOT in the checkpoint and keep "
                "their random init:"
            )
            lines += [f"    {g}" for g in _group(self.missing)]
        if self.unexpected:
            lines.append(
                f"{len(self.unexpected)} checkpoint tensors have no place in this model and were "
                "SKIPPED:"
            )
            lines += [f"    {g}" for g in _group(self.unexpected)]
        if self.incorrect_shapes:
            lines.append(
                f"{len(self.incorrect_shapes)} checkpoint tensors have another shape in this "
                "model and were SKIPPED:"
            )
            lines += [
                f"    {name}: {tuple(ckpt)} in the checkpoint, {tuple(model)} in the model"
                for name, ckpt, model in self.incorrect_shapes
            ]
        lines += [
            "Check that MODEL.WEIGHTS was written by this architecture (MODEL.RESNETS.DEPTH, "
            "MODEL.BACKBONE.NAME, head settings). Skipped class-specific predictors are expected "
            "only when MODEL.ROI_HEADS.NUM_CLASSES (or ROI_KEYPOINT_HEAD.NUM_KEYPOINTS) differs "
            "from the checkpoint's.",
            _BANNER,
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return "\n".join(part for part in (self.summary(), self.warning()) if part)


class NonLocalCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reports what each load did and rejects bad checkpoints.

    Saving is unchanged. Loading accepts what ``DetectionCheckpointer`` does: ``.pth`` files
    written by Detectron2 (``{"model": state_dict, ...}`` or a bare state dict), model-zoo and
    Caffe2 ``.pkl`` files (matched by name suffix after Detectron2's name conversion), and URLs
    such as ``detectron2://...``. Additionally:

    - ``.pth`` files are read with ``torch.load(weights_only=True)``, which unpickles tensors
      and plain containers only, whatever the PyTorch version's default;
    - after each load, :attr:`report` (a :class:`LoadReport`) says which parameters were newly
      initialised (the NL blocks, grouped per block); it is logged, and any parameter that
      should have loaded but did not (missing, unexpected or shape-mismatched) is logged as a
      warning under a banner;
    - a path that does not exist, a file that is not a checkpoint, a truncated file and a
      checkpoint without model weights raise :class:`CheckpointError` naming the file;
    - resuming (loading checkpointables such as the trainer's iteration, optimizer and
      scheduler) from a checkpoint written by another model raises :class:`CheckpointError`
      before any of that state is restored.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", **kwargs: Any) -> None:
        """
        Args:
            model, save_dir, kwargs: as for ``DetectionCheckpointer`` (``save_to_disk`` and the
                checkpointables, e.g. ``trainer=weakref.proxy(trainer)``).
        """
        super().__init__(model, save_dir, **kwargs)
        self.report: Optional[LoadReport] = None
        self._path = ""
        self._restoring: tuple[str, ...] = ()

    def load(self, path: str, checkpointables: Optional[list[str]] = None) -> dict[str, Any]:
        """Load ``path`` into the model, and the named ``checkpointables`` (all if None).

        Returns:
            The checkpoint's entries that were not loaded (e.g. ``iteration``), as
            ``Checkpointer.load``; the :class:`LoadReport` is in :attr:`report`.

        Raises:
            CheckpointError: see the class docstring.
        """
        self.report = None
        if not path:
            return super().load(path, checkpointables)
        file, query = _split_query(path)
        local = self._local_file(file)
        self._path = path
        self._restoring = tuple(
            self.checkpointables if checkpointables is None else checkpointables
        )
        try:
            return super().load(f"{local}?{query}" if query else local, checkpointables)
        finally:
            self._path, self._restoring = "", ()
            reset_checkpointer_after_failed_load(self)

    def _local_file(self, path: str) -> str:
        if os.path.isfile(path):
            return path
        if "://" in path:
            try:
                local = self.path_manager.get_local_path(path)
            except Exception as e:  # noqa: BLE001  (any failure to fetch needs the same fix)
                raise CheckpointError(
                    f"Could not get checkpoint {path}: {type(e).__name__}: {e}. Download it on a "
                    "machine with internet access and pass the local file as MODEL.WEIGHTS."
                ) from None
            if os.path.isfile(local):
                return local
        if os.path.isdir(path):
            raise CheckpointError(
                f"Checkpoint {path!r} is a directory. Pass a checkpoint file, e.g. "
                f"{os.path.join(path, 'model_final.pth')}."
            )
        raise CheckpointError(
            f"Checkpoint {path!r} does not exist (looked at {os.path.abspath(path)}). Pass an "
            "existing .pth or .pkl file or a URL as MODEL.WEIGHTS, or MODEL.WEIGHTS '' to start "
            "from scratch."
        )

    def _load_file(self, filename: str) -> dict[str, Any]:
        path = self._path or filename
        if os.path.getsize(filename) == 0:
            raise CheckpointError(
                f"Checkpoint {path} is an empty file (0 bytes): it was not written or "
                "downloaded completely. Copy or download it again."
            )
        try:
            if filename.endswith((".pkl", ".pyth")):
                checkpoint = super()._load_file(filename)
            else:
                # As DetectionCheckpointer, but without unpickling arbitrary objects: the files
                # Detectron2 writes hold tensors, numbers, strings and containers only.
                checkpoint = torch.load(filename, map_location="cpu", weights_only=True)
                if isinstance(checkpoint, Mapping) and "model" not in checkpoint:
                    checkpoint = {"model": checkpoint}
        except Exception as e:  # noqa: BLE001  (whatever the unpickler meets, the file is bad)
            raise CheckpointError(_unreadable_message(path, filename, e)) from None
        _check_model_weights(path, checkpoint)
        _, query = _split_query(path)
        if query:  # Detectron2 main's query: the only one it reads
            options = parse_qs(query)
            if options.pop("matching_heuristics", None) == ["True"]:
                checkpoint["matching_heuristics"] = True
            if options:
                raise CheckpointError(
                    f"Checkpoint {path!r}: unknown query {sorted(options)}; the only one read "
                    "is ?matching_heuristics=True (match names by suffix)."
                )
        return checkpoint

    def _load_model(self, checkpoint: dict[str, Any]) -> _IncompatibleKeys:
        source = _source(checkpoint)
        incompatible = super()._load_model(checkpoint)
        self.report = _make_report(self.model, incompatible, self._path, source)
        restoring = [name for name in self._restoring if name in checkpoint]
        if restoring:
            self._check_resumable(checkpoint, restoring)
        return incompatible

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        # Replaces fvcore's lists of missing / unexpected keys with the report.
        if self.report is None:
            super()._log_incompatible_keys(incompatible)
            return
        logger.info(self.report.summary())
        if self.report.has_problems:
            logger.warning(self.report.warning())

    def _check_resumable(self, checkpoint: Mapping[str, Any], names: Sequence[str]) -> None:
        """Raise if the checkpoint's model or optimizer state is not this model's."""
        assert self.report is not None
        problems = _describe_mismatch(self.report)
        for name in names:
            problems += _optimizer_mismatches(checkpoint[name], self.checkpointables[name], name)
        if problems:
            raise CheckpointError(
                f"Cannot resume training from {self._path}: it was written by another model: "
                + "; ".join(problems)
                + ". To fine-tune this model from those weights, start a new run: pass "
                f"MODEL.WEIGHTS {self._path} without --resume, with a new OUTPUT_DIR (resuming "
                "reads OUTPUT_DIR/last_checkpoint, and a run writes its checkpoints there)."
            )


def _split_query(path: str) -> tuple[str, str]:
    """``"x.pth?matching_heuristics=True"`` -> ``("x.pth", "matching_heuristics=True")``, for
    the hosts whose checkpointer takes the query (Detectron2 main); a query elsewhere is refused
    with the alternative."""
    file, mark, query = path.partition("?")
    if not mark or os.path.isfile(path):
        return path, ""
    if not CHECKPOINTER_TAKES_URL_QUERIES:
        raise CheckpointError(
            f"Checkpoint {path!r}: this Detectron2 (v0.6) does not read a '?{query}' query after "
            "the file name; Detectron2 main does. Pass the file alone, or build Detectron2 from "
            "source (README, 'Support matrix')."
        )
    return file, query


def _source(checkpoint: Mapping[str, Any]) -> str:
    """The checkpoint's format, from the markers ``DetectionCheckpointer._load_file`` sets."""
    author = checkpoint.get("__author__")
    if author == "Caffe2":
        return "Caffe2/Detectron checkpoint, names converted"
    if author is not None:
        return f"checkpoint by {author!r}, names matched by suffix"
    if checkpoint.get("matching_heuristics", False):
        return "checkpoint, names matched by suffix"
    return "Detectron2 checkpoint"


def _unreadable_message(path: str, filename: str, error: Exception) -> str:
    """Why ``filename`` (the local copy of ``path``) could not be read, and what to do."""
    with open(filename, "rb") as f:
        head = f.read(16)
    # The first sentence of the error: torch appends paragraphs of general advice.
    reason = f"{type(error).__name__}: {str(error).strip().split('. ')[0].splitlines()[0]}"
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if unsupported:
        return (
            f"Checkpoint {path} holds Python objects other than tensors (first: "
            f"{unsupported.group(1)}), which torch.load(weights_only=True) refuses to unpickle "
            "because unpickling them can run arbitrary code. Detectron2 checkpoints hold tensors "
            "only. If you trust the file, save its weights as tensors: "
            "torch.save({k: torch.as_tensor(v) for k, v in "
            "torch.load(path, weights_only=False)['model'].items()}, 'weights.pth')."
        )
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        kind = "a PyTorch zip archive" if head.startswith(_ZIP_MAGIC) else "a pickle"
        return (
            f"Checkpoint {path} is truncated or corrupt: it starts as {kind} but cannot be read "
            f"({reason}). It was probably not completely written or downloaded; copy or download "
            "it again."
        )
    text = head.decode("utf-8", errors="replace")
    printable = all(c.isprintable() or c in "\t\r\n" for c in text)
    looks = "text (JSON, YAML, ...)" if printable else "not a format Detectron2 reads"
    return (
        f"{path} is not a checkpoint: it starts with {head!r}, {looks}, while Detectron2 "
        "checkpoints are PyTorch files (.pth) and model-zoo / Caffe2 files are pickles (.pkl). "
        "Pass a checkpoint as MODEL.WEIGHTS."
    )


def _check_model_weights(path: str, checkpoint: Any) -> None:
    """Raise unless ``checkpoint["model"]`` is a non-empty map of names to tensors or arrays."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(checkpoint).__name__}, not model weights "
            "(a dict {'model': {name: tensor}} or {name: tensor})."
        )
    weights = checkpoint.get("model")
    entries = weights if isinstance(weights, Mapping) else checkpoint
    not_weights = [
        str(k) for k, v in entries.items() if not isinstance(v, (torch.Tensor, np.ndarray))
    ]
    if isinstance(weights, Mapping) and weights and not not_weights:
        return
    # A file without a "model" entry was wrapped as {"model": file}: these are its own keys.
    keys = sorted(map(str, entries))
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
    raise CheckpointError(
        f"Checkpoint {path} holds no model weights: its entries [{shown}] include "
        f"{len(not_weights)} that are not tensors ({', '.join(sorted(not_weights)[:5])}). "
        "Model weights are a {name: tensor} dict, alone or under 'model'. Pass a model "
        "checkpoint as MODEL.WEIGHTS, e.g. OUTPUT_DIR/model_final.pth of a training run."
    )


def _make_report(
    model: nn.Module, incompatible: _IncompatibleKeys, path: str, source: str
) -> LoadReport:
    state = model.state_dict()
    blocks = [name for name, _ in non_local_blocks(model)]
    missing = set(incompatible.missing_keys)
    # A batch norm missing from the checkpoint gets its num_batches_tracked filled in silently.
    missing |= {
        k
        for k in state
        if k.endswith(".num_batches_tracked")
        and k.replace(".num_batches_tracked", ".running_mean") in missing
    }
    loaded = [k for k in state if k not in missing]
    # A backbone-only (ImageNet) checkpoint: the detector layers are expected to be missing.
    backbone_only = bool(loaded) and all(_RESNET_KEY.search(k) for k in loaded)

    by_block: dict[str, list[str]] = defaultdict(list)
    other_missing = []
    for key in missing:
        block = next((b for b in blocks if key.startswith(b + ".")), None)
        if block is not None:
            by_block[block].append(key[len(block) + 1 :])
        else:
            other_missing.append(key)
    new_non_local = {}
    for block, names in by_block.items():
        if len(names) == sum(k.startswith(block + ".") for k in state):
            new_non_local[block] = sorted(names, key=_natural)
        else:  # partly loaded: not a fresh block, something is wrong
            other_missing += [f"{block}.{n}" for n in names]
    from_scratch = [k for k in other_missing if backbone_only and not _RESNET_KEY.search(k)]
    unexpected, ignored = [], []
    for key in incompatible.unexpected_keys:
        imagenet_only = key in _UNUSED_IMAGENET_KEYS or not _RESNET_KEY.search(key)
        (ignored if backbone_only and imagenet_only else unexpected).append(key)
    return LoadReport(
        path=path,
        source=source,
        num_tensors=len(state),
        num_loaded=len(loaded),
        new_non_local=dict(sorted(new_non_local.items(), key=lambda kv: _natural(kv[0]))),
        from_scratch=sorted(from_scratch, key=_natural),
        missing=sorted(set(other_missing) - set(from_scratch), key=_natural),
        unexpected=sorted(unexpected, key=_natural),
        ignored=sorted(ignored, key=_natural),
        incorrect_shapes=list(incompatible.incorrect_shapes),
    )


def _describe_mismatch(report: LoadReport) -> list[str]:
    """The ways the checkpoint's tensors differ from the model's, for the resume error."""
    parts = []
    if report.new_non_local:
        blocks = ", ".join(report.new_non_local)
        parts.append(f"it has none of the {len(report.new_non_local)} non-local blocks ({blocks})")
    others = report.missing + report.from_scratch
    if others:
        parts.append(f"it lacks {len(others)} other tensors (of {', '.join(_modules(others))})")
    if report.unexpected or report.ignored:
        parts.append(
            f"{len(report.unexpected) + len(report.ignored)} of its tensors are not in this model"
        )
    if report.incorrect_shapes:
        parts.append(f"{len(report.incorrect_shapes)} of its tensors have another shape here")
    return parts


def _optimizer_states(state: Any, where: str) -> dict[str, Mapping[str, Any]]:
    """Every optimizer state dict (``{"state", "param_groups"}``) inside ``state``, by path."""
    if not isinstance(state, Mapping):
        return {}
    if "state" in state and "param_groups" in state:
        return {where: state}
    found: dict[str, Mapping[str, Any]] = {}
    for key, value in state.items():
        found.update(_optimizer_states(value, f"{where}[{key!r}]"))
    return found


def _optimizer_mismatches(saved: Any, live_object: Any, name: str) -> list[str]:
    """How the optimizer states saved under checkpoint[name] differ from the live ones."""
    saved_states = _optimizer_states(saved, f"[{name!r}]")
    if not saved_states:
        return []
    live_states = _optimizer_states(live_object.state_dict(), f"[{name!r}]")
    problems = []
    for where, saved_state in saved_states.items():
        live_state = live_states.get(where)
        if live_state is None:
            continue
        saved_sizes = [len(g["params"]) for g in saved_state["param_groups"]]
        live_sizes = [len(g["params"]) for g in live_state["param_groups"]]
        if saved_sizes != live_sizes:
            problems.append(
                f"the optimizer state checkpoint{where} has {len(saved_sizes)} parameter "
                f"group(s) of {_sizes(saved_sizes)} parameters ({sum(saved_sizes)} in all), this "
                f"model's optimizer has {len(live_sizes)} of {_sizes(live_sizes)} "
                f"({sum(live_sizes)})"
            )
    return problems


def _sizes(sizes: Sequence[int]) -> str:
    return "/".join(map(str, sizes))


def _natural(key: str) -> list[Any]:
    """Sort key putting ``res4.9`` before ``res4.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _group(keys: Iterable[str], max_lines: int = 24) -> list[str]:
    """``["a.b.weight", "a.b.bias"]`` -> ``["a.b.{bias, weight}"]``, one line per module; more
    than ``max_lines`` modules are shown one line per block (``"res4.6.*  (15 tensors)"``)."""
    keys = sorted(keys, key=_natural)
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        head, _, tail = key.rpartition(".")
        groups[head].append(tail)
    if len(groups) > max_lines:
        blocks: dict[str, int] = defaultdict(int)
        for key in keys:
            parts = key.split(".")
            end = next((i for i, p in enumerate(parts) if p.isdigit()), min(2, len(parts) - 1))
            blocks[".".join(parts[: end + 1])] += 1
        return [f"{prefix}.*  ({n} tensors)" for prefix, n in blocks.items()]
    out = []
    for head, tails in groups.items():
        names = tails[0] if len(tails) == 1 else "{" + ", ".join(tails) + "}"
        out.append(f"{head}.{names}" if head else names)
    return out


def _modules(keys: Iterable[str]) -> list[str]:
    """The distinct two-level module prefixes of ``keys``, e.g. ``roi_heads.box_head``."""
    return sorted({".".join(key.split(".")[:2]) for key in keys})
