"""The error type for mistakes a user can fix from the command line, config or environment."""

__all__ = ["UserInputError"]


class UserInputError(Exception):
    """A missing dataset, an unreachable weights file, a bad config key, ...

    The message says what is wrong (naming the bad value or the paths looked at) and how to fix
    it; command-line tools print it without a traceback and exit with a non-zero status.
    """
