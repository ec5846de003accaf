"""The error the visualisation tools raise for a bad input (file, dataset, point, model)."""

__all__ = ["VisualizationError"]


class VisualizationError(ValueError):
    """A bad input to a visualisation tool; the message names the bad value and the fix.

    The command-line tools print the message without a traceback and exit with status 2.
    """
