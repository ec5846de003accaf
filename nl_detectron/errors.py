"""The errors nl_detectron reports to the user: each message names the bad value (or the paths
looked at) and the fix, and command-line tools print it without a traceback."""

__all__ = ["CheckpointError", "TrainingDivergedError", "UserInputError"]


class UserInputError(Exception):
    """A mistake a user can fix from the command line, config or environment: a missing dataset,
    an unreachable weights file, a bad config key, ..."""


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: missing, unreadable, holding no model weights, or
    written by another model when resuming. The message names the file, the problem and the fix.
    """


class TrainingDivergedError(UserInputError):
    """The loss or the weights became NaN or infinite: training cannot go on."""
