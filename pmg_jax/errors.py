"""The one base class of the errors a user can fix (a bad config, file, checkpoint, dataset or input).

Each command line catches `PMGError` alone and prints its message, which is one line naming the field,
file or flag, and exits with status 1; anything else is a bug and keeps its traceback.
"""


class PMGError(Exception):
    """An error in what the user gave; the message is one line that says what to change."""


class ConfigError(PMGError, ValueError):
    """A config value that cannot work; the message names the field."""
