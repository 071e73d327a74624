"""Mistakes a user can fix: the command-line entry points print their message on one line and exit with 2.

Every error that a bad command, config value, input file or missing download can cause derives from
`UsageError`; anything else is a bug and keeps its traceback. The subclasses also derive from the
built-in type that describes them (ValueError, FileNotFoundError, OSError), so callers that catch
those keep working.
"""
from __future__ import annotations


class UsageError(Exception):
    """A problem in what the user asked for; the message names the problem and the fix."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or directory named in the config does not exist."""


class InvalidSettingError(UsageError, ValueError):
    """A config value that composes but cannot be used."""


class UnavailableError(UsageError, OSError):
    """Something the run needs cannot be reached (no network, no package index, no cached copy)."""


class DeviceMemoryError(UsageError, MemoryError):
    """The device ran out of memory in a phase whose size a setting controls; the message names that setting."""


class DamagedFileError(UsageError, ValueError):
    """A file an earlier run wrote (its results, a checkpoint, an unpacked model) cannot be read; the message names it
    and what to remove so that the run redoes that part."""
