"""Errors that tell the user which file, line or field is at fault and how to fix it."""

from __future__ import annotations


class MedfoundryError(Exception):
    """Base class for errors shown to the user without a traceback."""


class ConfigError(MedfoundryError):
    """A configuration file or override is invalid."""


class InputError(MedfoundryError):
    """An input file is malformed. Carries the file and, when known, the line."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # survives the trip back from a worker process
        return (InputError, (self.path, self.message, self.line))


class StageFailed(MedfoundryError):
    """A stage ran and failed for a reason that is neither its config nor its inputs (training diverged, a
    download or an upload failed after its retries, a launched job left no result): exit code 1, where usage,
    config and input errors exit 2."""


class Pending(MedfoundryError):
    """Work was handed to a scheduler and is not finished yet; running the same command again continues."""


class FolderBusy(MedfoundryError):
    """Another live process holds the lock of a folder this one would write (a second run on the same run or
    output folder): the message names it (pid, host, command line, since when)."""
