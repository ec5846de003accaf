"""Build the full config of a run: detectron2 defaults + ``MODEL.NONLOCAL`` + file + overrides."""

from __future__ import annotations

import os
from collections.abc import Sequence

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
            raise UserInputError(f"In config file {config_file}: {_reason(e)}") from None
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
        raise UserInputError(f"In the command-line overrides: {_reason(e)}") from None
    return cfg


def _reason(error: Exception) -> str:
    """yacs's message, with a hint for the commonest mistake."""
    message = str(error.args[0]) if error.args else repr(error)
    if "Non-existent" in message:
        message += (
            ". Check the spelling against detectron2's defaults (detectron2/config/defaults.py) "
            "and nl_detectron's MODEL.NONLOCAL node (nl_detectron/config.py)"
        )
    return message
