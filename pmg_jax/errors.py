"""The one base class of the errors a user can fix (a bad config, file, checkpoint, dataset or input).

Each command line catches `PMGError` alone and prints its message, which is one line naming the field,
file or flag, and exits with status 1; anything else is a bug and keeps its traceback.
"""

import os
import tempfile


class PMGError(Exception):
    """An error in what the user gave; the message is one line that says what to change."""


class ConfigError(PMGError, ValueError):
    """A config value that cannot work; the message names the field."""


class OutputError(PMGError, OSError):
    """Output that cannot be written where it was to go; the message names the place and the flag that moves it."""


def check_writable(path: str, remedy: str) -> None:
    """That a directory can be made or written at `path`, checked by writing a temporary file in its nearest
    existing ancestor (nothing is left behind); else an OutputError 'cannot write PATH: REASON: REMEDY' (e.g.
    remedy 'pass --out DIR'), before any work is done."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputError(f"cannot write {path}: {probe} is a file, not a directory: {remedy}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e} ({probe}): {remedy}") from None
