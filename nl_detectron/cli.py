"""What every command-line tool of ``tools/`` does around its work: parse the arguments, set up
logging and the known-warning filters, and end on a user error with its message, not a
traceback."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Optional

from .errors import CheckpointError, UserInputError
from .third_party_warnings import ignore_known_third_party_warnings

__all__ = ["run_tool"]


def run_tool(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], Optional[str]],
    argv: Optional[Sequence[str]] = None,
) -> None:
    """``body(parser.parse_args(argv))``, logging ``Wrote PATH`` for the path it returns.

    A :class:`UserInputError` or :class:`CheckpointError` ends the program with exit status 2
    and ``PROG: error: MESSAGE``, as argparse reports a bad argument.
    """
    ignore_known_third_party_warnings()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = body(args)
    except (UserInputError, CheckpointError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if path:
        logging.getLogger(parser.prog).info("Wrote %s", path)
