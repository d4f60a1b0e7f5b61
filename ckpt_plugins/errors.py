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

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from string import Template
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
    """An option has an invalid value (the message names the option, shows the value, says what to do).

    Attributes:
        option: the option at fault, as the user spells it (None for errors about no one option).
        value: the value it was given.

    A message may spell option names as ``$name`` placeholders (``option`` and each of
    ``mentions``): they read as the plain name, and :meth:`renamed` (or :func:`renamed_options`)
    gives the same error in an adapter's spelling, e.g. ``--ckpt_monitor`` for a command-line flag.

    Example:
        >>> exc = ConfigError("$keep_best=2 needs $monitor", option="keep_best", value=2, mentions=("monitor",))
        >>> str(exc), str(exc.renamed({"monitor": "--ckpt_monitor", "keep_best": "--ckpt_keep_best"}))
        ('keep_best=2 needs monitor', '--ckpt_keep_best=2 needs --ckpt_monitor')
    """

    def __init__(
        self,
        message: str,
        *,
        option: str | None = None,
        value: Any = None,
        mentions: Iterable[str] = (),
        names: Mapping[str, str] | None = None,
    ) -> None:
        self.template = message
        self.key = option
        self.mentions = tuple(dict.fromkeys([*([option] if option else []), *mentions]))
        self.names = dict(names or {})
        self.option = self.names.get(option, option) if option else None
        self.value = value
        text = message
        if self.mentions:
            text = Template(message).safe_substitute({n: self.names.get(n, n) for n in self.mentions})
        super().__init__(text)

    def renamed(self, names: Mapping[str, str]) -> ConfigError:
        """The same error with option names spelled by ``names`` (plain name -> user-facing name)."""
        return type(self)(
            self.template, option=self.key, value=self.value, mentions=self.mentions, names={**self.names, **names}
        )

    def __reduce__(self) -> Any:  # picklable (errors cross to writer processes and ranks)
        return (_rebuild_config_error, (type(self), self.template, self.key, self.value, self.mentions, self.names))


def _rebuild_config_error(
    cls: type[ConfigError],
    template: str,
    option: str | None,
    value: Any,
    mentions: tuple[str, ...],
    names: dict[str, str],
) -> ConfigError:
    return cls(template, option=option, value=value, mentions=mentions, names=names)


@contextmanager
def renamed_options(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` from the block with option names spelled by ``names``.

    Adapters wrap the construction of core options in it, so that a message names the option as
    their users wrote it (``--ckpt_max_pending`` rather than ``max_pending``).
    """
    try:
        yield
    except ConfigError as exc:
        raise exc.renamed(names).with_traceback(exc.__traceback__) from None


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


class WriterError(SaveError):
    """The background writer itself failed (its thread raised outside a save, or its process
    died): every save that was waiting for it failed with this error, and the manager refuses
    further saves. Open a new manager (after fixing the cause) to save again."""


class DistributedError(CheckpointError, RuntimeError):
    """Ranks disagreed (for example on the step) or one of them failed."""
