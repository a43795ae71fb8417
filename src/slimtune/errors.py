"""The root of every error a user can fix: the message says what to change.

The CLI catches exactly `SlimtuneError` and prints its message; anything else is a bug and shows its
traceback. Each subclass also derives from the builtin its callers have long caught (ValueError,
FileNotFoundError, OSError), so `except ValueError` around slimtune keeps working.
"""
from __future__ import annotations


class SlimtuneError(Exception):
    """A problem the user can fix; the message names the file, key or value and what would be accepted."""


# -- what the input says -------------------------------------------------------------------------------------

class ConfigError(SlimtuneError, ValueError):
    """A config problem found before any compute; the message says what to change."""


class DataError(SlimtuneError, ValueError):
    """A data problem found before training; the message names the file, column and value."""


class ModelError(SlimtuneError, ValueError):
    """A model that cannot be found or loaded; the message says what to install or change."""


class MethodError(SlimtuneError, ValueError):
    """A method that cannot be applied here (hardware, task or model); the message says why and what to use."""


# -- what is on disk -----------------------------------------------------------------------------------------

class RunFolderError(SlimtuneError, ValueError):
    """A folder that is not a readable run folder; the message says what is wrong."""


class RunNotFound(SlimtuneError, FileNotFoundError):
    """A path given as a run folder that is not one (no config.yaml, no checkpoint, no adapter)."""


class InputNotFound(SlimtuneError, FileNotFoundError):
    """A file the user named (an image to predict, a weights file) that is not there."""


class OutputExists(SlimtuneError, FileExistsError):
    """A folder to write into that already holds files."""


class UsageError(SlimtuneError, ValueError):
    """A command-line value that is not accepted (a --where filter, a --format, a missing argument)."""
