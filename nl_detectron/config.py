"""nl_detectron's config: one node, ``MODEL.NONLOCAL``, for every non-local option, and the
full config of a run (Detectron2's defaults + that node + a YAML file + overrides).

Values are checked where they are used (the block and the builders of :mod:`.modeling`), which
name the config key in their errors.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.config import CfgNode as CN

from .device import AUTO, default_device
from .errors import UserInputError

__all__ = ["add_nonlocal_config", "load_config", "non_local_block_args"]


def add_nonlocal_config(cfg: CN) -> None:
    """Add the ``MODEL.NONLOCAL`` node, ``MODEL.ROI_KEYPOINT_HEAD.NORM`` and
    ``SOLVER.AMP.PRECISION`` to a Detectron2 config (in place).

    The node is read by the components nl_detectron registers: the backbones
    ``build_non_local_resnet_backbone`` / ``build_non_local_resnet_fpn_backbone`` and the heads
    ``NonLocalKRCNNConvDeconvUpsampleHead`` / ``NonLocalMaskRCNNConvUpsampleHead``. Components
    that are not selected ignore it, so a vanilla config stays vanilla.
    """
    _C = cfg
    _C.MODEL.NONLOCAL = CN()
    # Where the backbone gets NL blocks: "STAGE:INDEX" inserts one block right before block INDEX
    # (0-based; negative counts from the end; INDEX == number of blocks puts it after the last)
    # of stage STAGE (res2..res5). Paper (Sec. 6): one block before the last res4 block.
    # An empty list builds no NL block in the backbone.
    _C.MODEL.NONLOCAL.BACKBONE_POSITIONS = ["res4:-1"]
    # FPN output levels ("p2".."p6") that get an NL block after their output conv, on the
    # features the RPN and RoI heads read. Not in the paper: none by default.
    _C.MODEL.NONLOCAL.FPN_POSITIONS = []
    # Features of the box branch ("p2"...) that get an NL block which only the box head reads
    # (the RPN and the mask / keypoint heads read them as they are); needs
    # MODEL.ROI_HEADS.NAME "NonLocalBoxFeatureROIHeads". Not in the paper: none by default.
    _C.MODEL.NONLOCAL.BOX_FEATURE_POSITIONS = []
    # NL block after conv k (1-based) of the keypoint head. Paper (Sec. 6): 4 blocks in the
    # 8-conv head, one after every 2 convs.
    _C.MODEL.NONLOCAL.KEYPOINT_HEAD_POSITIONS = [2, 4, 6, 8]
    # NL block after conv k (1-based) of the mask head. Not in the paper: none by default.
    _C.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = []
    # Pairwise function f: "embedded_gaussian" (paper's default), "gaussian", "dot_product",
    # "concatenation" (Sec. 3.2); "disentangled" (DNL, Yin et al. 2020: a whitened pairwise term
    # plus a unary term) or "global_context" (GCNet's query-independent simplified block, Cao et
    # al. 2019: the control that cannot relate positions).
    _C.MODEL.NONLOCAL.PAIRWISE = "embedded_gaussian"
    # Temperature of the whitened logits of PAIRWISE "disentangled". DNL's code: 0.05.
    _C.MODEL.NONLOCAL.TEMPERATURE = 0.05
    # Channels of theta, phi and g as a fraction of the block's input channels. Paper: 0.5.
    _C.MODEL.NONLOCAL.BOTTLENECK_RATIO = 0.5
    # Max-pool phi and g by 2x2 (Sec. 3.3). Paper: True.
    _C.MODEL.NONLOCAL.SUB_SAMPLE = True
    # Sub-sample x itself before phi and g, as FAIR's released code and pytorchvideo do, instead of
    # phi(x) and g(x), as the paper's text (Sec. 3.3) and mmcv do: another function. Default False.
    _C.MODEL.NONLOCAL.SUB_SAMPLE_INPUT = False
    # Pooling keeps partial windows at odd sizes (ceil mode); False drops them (floor mode), as the
    # released code and pytorchvideo do. Default True.
    _C.MODEL.NONLOCAL.SUB_SAMPLE_CEIL = True
    # Scale the softmax logits by inner_channels ** -0.5 (the released code's default; the
    # Gaussian form, without embeddings, uses channels ** -0.5). False: scale 1, paper's formula.
    _C.MODEL.NONLOCAL.USE_SCALE = True
    # Norm after W_z, its gamma initialised to 0 (Sec. 4.1): "BN" (paper), "SyncBN", "GN" or ""
    # (none; W_z is zero-initialised instead). "FrozenBN" is refused: it would keep the block an
    # identity forever.
    _C.MODEL.NONLOCAL.NORM = "BN"
    # Init of the blocks' 1x1 convs: "normal" (std INIT_STD, the released code's), "msra" (the
    # paper's words) or "fan_in" (std 1/sqrt(fan-in): unit-variance logits at any width).
    _C.MODEL.NONLOCAL.INIT = "normal"
    # Std of the "normal" init. Released code: 0.01.
    _C.MODEL.NONLOCAL.INIT_STD = 0.01
    # Initial gamma of the norm after W_z. Paper: 0 (the block starts as an exact identity, as
    # fine-tuning a pretrained detector needs). Small positive values give the pairwise function
    # a gradient from the first step when training from scratch (docs/evidence.md).
    _C.MODEL.NONLOCAL.GATE_INIT = 0.0
    # Learning rate of the NL blocks' parameters as a multiple of SOLVER.BASE_LR (the schedule
    # and warm-up apply as to the rest). Paper: 1 (not stated otherwise).
    _C.MODEL.NONLOCAL.LR_FACTOR = 1.0
    # The update rule of the NL blocks' parameters: "SGD" (the detector's, SOLVER.MOMENTUM and
    # the rest) or "AdamW" (at LR_FACTOR x SOLVER.BASE_LR, e.g. 0.02 x 0.05 = 1e-3, with the
    # same schedule; the rest of the detector keeps SGD). AdamW's step does not shrink with the
    # small gradients a near-uniform attention gives theta and phi (docs/evidence.md).
    _C.MODEL.NONLOCAL.OPTIMIZER = "SGD"
    # Modules of the detector (names as in model.named_modules(), e.g.
    # "roi_heads.box_predictor") whose parameters are updated as the NL blocks' are (OPTIMIZER,
    # LR_FACTOR): a classifier that reads the blocks' output learns at their pace.
    _C.MODEL.NONLOCAL.OPTIMIZE_WITH_BLOCKS = []

    # A norm after each conv of NonLocalKRCNNConvDeconvUpsampleHead ("GN", "BN", ...), as the box
    # and mask heads' NORM; "": none, the paper's and Detectron2's keypoint head.
    if "NORM" not in _C.MODEL.ROI_KEYPOINT_HEAD:
        _C.MODEL.ROI_KEYPOINT_HEAD.NORM = ""

    # Mixed precision (with SOLVER.AMP.ENABLED): the autocast dtype, "float16" (Detectron2's, with
    # loss scaling) or "bfloat16" (Ampere and newer GPUs; no loss scaling). Detectron2 main's
    # AMPTrainer takes a precision but its config has no key for it; v0.6's is float16 only.
    if "PRECISION" not in _C.SOLVER.AMP:
        _C.SOLVER.AMP.PRECISION = "float16"


def non_local_block_args(cfg: CN) -> dict[str, Any]:
    """``NonLocalBlock`` keyword arguments from ``MODEL.NONLOCAL`` (all but the channel counts):
    ``pairwise``, ``sub_sample``, ``pool_input``, ``ceil_mode``, ``scale``, ``norm`` and
    ``init``, ``init_std``, ``gate_init``, ``temperature``. The inner width depends
    on each block's channels and is given by ``MODEL.NONLOCAL.BOTTLENECK_RATIO``."""
    node = cfg.MODEL.NONLOCAL
    return {
        "pairwise": node.PAIRWISE,
        "sub_sample": node.SUB_SAMPLE,
        "pool_input": node.SUB_SAMPLE_INPUT,
        "ceil_mode": node.SUB_SAMPLE_CEIL,
        # None: the block's default, inner_channels ** -0.5 as in the released code.
        "scale": None if node.USE_SCALE else 1.0,
        "norm": node.NORM,
        "init": node.INIT,
        "init_std": node.INIT_STD,
        "gate_init": node.GATE_INIT,
        "temperature": node.TEMPERATURE,
    }


def load_config(config_file: str, opts: Sequence[str] | None = None) -> CfgNode:
    """The (mutable) config of a run: ``get_cfg()`` with :func:`add_nonlocal_config`, then
    ``config_file`` (if not empty) and the ``KEY VALUE`` overrides ``opts`` merged in.
    ``MODEL.DEVICE "auto"`` (the bundled quickstart and context configs) becomes ``"cuda"`` when
    PyTorch sees a GPU, else ``"cpu"``; an explicit device is kept.

    Raises:
        UserInputError: the config file does not exist or is not valid YAML, or a key is unknown,
            a value has the wrong type, or ``opts`` is not a list of pairs.
    """
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise UserInputError(
                f"Config file {config_file!r} not found (looked at "
                f"{os.path.abspath(config_file)}). Pass --config-file with an existing YAML "
                "file, e.g. one under configs/."
            )
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError) as e:
            raise UserInputError(f"In config file {config_file}: {_reason(e, cfg)}") from None
        except yaml.YAMLError as e:
            raise UserInputError(f"Config file {config_file} is not valid YAML: {e}") from None
        except FileNotFoundError as e:  # a missing _BASE_
            raise UserInputError(
                f"Config file {config_file} refers (through _BASE_) to a file that does not "
                f"exist: {e.filename}. _BASE_ paths are relative to the file that names them."
            ) from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserInputError(
            f"Config overrides must be KEY VALUE pairs; got an odd number of items: {opts}."
        )
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise UserInputError(f"In the command-line overrides: {_reason(e, cfg)}") from None
    if cfg.MODEL.DEVICE == AUTO:
        cfg.MODEL.DEVICE = default_device()
    return cfg


_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")


def _reason(error: Exception, cfg: CfgNode) -> str:
    """yacs's message, with the closest existing keys for an unknown one."""
    message = str(error.args[0]) if error.args else repr(error)
    unknown = _UNKNOWN_KEY.search(message)
    if unknown:
        close = _close_keys(unknown.group(1), cfg)
        if close:
            message += f". Did you mean {' or '.join(close)}?"
        else:
            message += (
                ". Check the spelling against detectron2's defaults "
                "(detectron2/config/defaults.py) and nl_detectron's MODEL.NONLOCAL node "
                "(nl_detectron/config.py)"
            )
    return message


def _keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    """Every key of ``node``, nodes included, as ``A.B.C``."""
    for name, value in node.items():
        key = prefix + name
        yield key
        if isinstance(value, CfgNode):
            yield from _keys(value, key + ".")


def _close_keys(key: str, cfg: CfgNode) -> list[str]:
    """The existing keys closest to ``key`` (all within a hair of the best match): by the whole
    dotted name (a misspelling), else by the last name alone (a key under the wrong node)."""
    keys = list(_keys(cfg))
    close = _best_matches(key, keys, key=lambda k: k)
    if close:
        return close
    leaf = key.rsplit(".", 1)[-1]
    return _best_matches(leaf, keys, key=lambda k: k.rsplit(".", 1)[-1])


def _best_matches(word: str, candidates: list[str], key: Callable[[str], str]) -> list[str]:
    scored = []
    for candidate in candidates:
        ratio = difflib.SequenceMatcher(None, word, key(candidate)).ratio()
        if ratio >= 0.8:
            scored.append((ratio, candidate))
    if not scored:
        return []
    best = max(ratio for ratio, _ in scored)
    return [c for ratio, c in sorted(scored, reverse=True) if ratio >= best - 0.02][:3]
