"""Exceptions raised by ckpt_plugins.

Every error is a subclass of a built-in exception, so existing ``except ValueError`` or
``except OSError`` handlers keep working, and of :class:`CheckpointError`, so callers can catch
everything this library raises in one clause. Messages say what was wrong, show the value, and
say what to do.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by ckpt_plugins."""


class ConfigError(CheckpointError, ValueError):
    """An option has an invalid value (the message names the option)."""


class StepExistsError(CheckpointError, FileExistsError):
    """A save at a step at or before an existing committed step, without ``overwrite=True``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested checkpoint (latest, best, a step or a path) does not exist."""


class CorruptCheckpointError(CheckpointError, OSError):
    """A checkpoint failed verification: checksum mismatch, missing/truncated file, bad manifest."""


class UnsupportedStateError(CheckpointError, TypeError):
    """The state holds an object that cannot be stored without pickle (the key path is named)."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A foreign file needs full pickle to load; refused unless the caller opts in explicitly."""


class NotWritableError(CheckpointError, PermissionError):
    """The checkpoint directory cannot be written (permissions, read-only file system)."""


class LockedError(CheckpointError, RuntimeError):
    """Another live manager holds the directory's write lock."""


class RestoreError(CheckpointError, KeyError):
    """A strict restore found missing, unexpected or mismatched keys (listed in the message)."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written.
        return str(self.args[0]) if self.args else ""


class SaveError(CheckpointError, RuntimeError):
    """A save failed (in the background or on another rank); the cause is chained."""


class DistributedError(CheckpointError, RuntimeError):
    """Ranks disagreed (for example on the step) or one of them failed."""
