"""Build the full config of a run: detectron2 defaults + ``MODEL.NONLOCAL`` + file + overrides."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator, Sequence

import yaml
from detectron2.config import CfgNode, get_cfg

from ..config import add_nonlocal_config
from .errors import UserInputError

__all__ = ["load_config"]


def load_config(config_file: str, opts: Sequence[str] | None = None) -> CfgNode:
    """The (mutable) config of a run: ``get_cfg()`` with :func:`add_nonlocal_config`, then
    ``config_file`` (if not empty) and the ``KEY VALUE`` overrides ``opts`` merged in.

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
