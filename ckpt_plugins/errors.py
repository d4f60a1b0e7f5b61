"""Exceptions raised by ckpt_plugins.

Every error is a subclass of a built-in exception, so existing ``except ValueError`` or
``except OSError`` handlers keep working, and of :class:`CheckpointError`, so callers can catch
everything this library raises in one clause. Messages say what was wrong, show the value, and
say what to do.

Errors about one entry of the state (:class:`UnsupportedStateError`, a
:class:`CorruptCheckpointError` from the state-tree decoder, :class:`RestoreError`) carry its
dotted key path in ``key_path`` (``"optimizer.state.0.exp_avg"``), so callers need not parse the
message; it is ``None`` for errors that are not about one key.
"""

from __future__ import annotations

from typing import Any


class CheckpointError(Exception):
    """Base class of every error raised by ckpt_plugins.

    Attributes:
        key_path: the dotted key path of the state entry the error is about, or None.
    """

    key_path: str | None = None

    def __init__(self, *args: Any, key_path: str | None = None) -> None:
        super().__init__(*args)
        self.key_path = key_path


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
    """A strict restore found target keys missing from the checkpoint or mismatched in shape or
    dtype (listed in the message).

    Attributes:
        key_path: the key at fault when there is exactly one, else None.
        report: the :class:`~ckpt_plugins.RestoreReport` of the check (``missing``, ``mismatched``
            and their ``details``).
    """

    def __init__(self, *args: Any, key_path: str | None = None, report: Any = None) -> None:
        super().__init__(*args, key_path=key_path)
        self.report = report

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written.
        return str(self.args[0]) if self.args else ""


class SaveError(CheckpointError, RuntimeError):
    """A save failed (in the background or on another rank); the cause is chained."""


class DistributedError(CheckpointError, RuntimeError):
    """Ranks disagreed (for example on the step) or one of them failed."""
