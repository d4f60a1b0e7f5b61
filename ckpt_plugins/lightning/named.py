"""Saves addressed by path (what Lightning's ``CheckpointIO`` gets), on top of the core.

Each parent directory gets one :class:`~ckpt_plugins.CheckpointManager` over that directory,
``distributed=False`` (Lightning calls the IO on global rank 0 only), so staging buffers are
reused, in-flight saves are bounded and saves run in order on one writer:

* ``save(path, ...)`` is ``mgr.save(step, state, name=os.path.basename(path))``: the core
  commits the folder as ``path`` atomically, replacing a folder already there through its
  ``.replaced-`` protocol (restored at start-up if a crash falls in between).
* ``remove(path)`` is ``mgr.delete(name)``: queued on the writer after every save submitted
  before it, so a delete never overtakes a save, and the caller does not wait.
* A name the core does not commit as a folder (a hidden one, such as the ``.temp.ckpt`` that
  Lightning's ``ddp_spawn``/``ddp_fork`` launchers save and then remove with a non-recursive
  ``fs.rm``) is written as a Lightning file, synchronously; plain files are removed as files.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.errors import ConfigError
from ckpt_plugins.layout.commit import REPLACED_PREFIX, check_folder_name
from ckpt_plugins.manager import CheckpointManager

__all__ = ["NamedSaves", "is_folder_name"]

log = logging.getLogger(__name__)


def is_folder_name(path: str) -> bool:
    """Whether the core can commit ``path``'s last component as a checkpoint folder."""
    try:
        check_folder_name(os.path.basename(path.rstrip("/")))
    except ConfigError:
        return False
    return True


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) if "://" not in path else path.rstrip("/").rsplit("/", 1)[0]


class _Dir:
    """One parent directory and its manager."""

    def __init__(self, parent: str, owner: "NamedSaves") -> None:
        self.parent = parent
        self.mgr = CheckpointManager(parent, distributed=False, async_save=owner.async_save,
                                     max_pending=owner.max_pending, writer=owner.writer, on_error=owner.on_error)

    def save(self, path: str, step: int, state: Any, user_metadata: dict[str, Any]) -> SaveHandle | None:
        return self.mgr.save(step, state, user_metadata=user_metadata, name=os.path.basename(path.rstrip("/")))

    def remove(self, path: str) -> None:
        storage = self.mgr.storage
        if storage.exists(path) and not storage.isdir(path):
            storage.remove_file(path)  # a plain file (Lightning's own format): no save of ours makes one
            log.debug("removed checkpoint file %s", path)
            return
        if is_folder_name(path):  # anything else is not ours to have saved as a folder
            self.mgr.delete(os.path.basename(path.rstrip("/")))


class NamedSaves:
    """Path-addressed asynchronous saves in the core's format (see the module docstring).

    Args:
        async_save: persist in the background (the call returns once the state is copied).
        max_pending: saves in flight per parent directory.
        writer: ``"thread"`` or ``"process"`` (as the core's ``writer``).
        on_error: ``"raise"`` or ``"warn"`` for failed background saves (as the core).
    """

    def __init__(self, *, async_save: bool = True, max_pending: int = 1, writer: str = "thread",
                 on_error: str = "raise") -> None:
        self.async_save, self.max_pending, self.writer, self.on_error = async_save, max_pending, writer, on_error
        self._dirs: dict[str, _Dir] = {}
        self._lock = threading.Lock()

    def _stage(self, path: str, create: bool = True) -> _Dir | None:
        """The manager of ``path``'s parent directory (created on first use)."""
        parent = _parent(path)
        with self._lock:
            entry = self._dirs.get(parent)
            if entry is None and create:
                entry = self._dirs[parent] = _Dir(parent, self)
            return entry

    def save(self, path: str, step: int, state: Any, user_metadata: dict[str, Any]) -> SaveHandle | None:
        """Save ``state`` (of training step ``step``) as the folder ``path``, replacing what is
        there once committed."""
        return self._stage(path).save(path, step, state, user_metadata)

    def remove(self, path: str) -> None:
        """Remove the checkpoint at ``path``, after the saves in flight to its directory."""
        entry = self._stage(path, create=False)
        if entry is None and not is_folder_name(path):  # e.g. a hidden Lightning file
            if os.path.isfile(path):
                os.remove(path)
            return
        (entry or self._stage(path)).remove(path)

    def recover(self, path: str) -> None:
        """Restore ``path`` if a crash fell between replacing it and committing its successor
        (the core's start-up cleanup does it when the directory's manager starts)."""
        parent = _parent(path)
        if "://" in path or self._stage(path, create=False) is not None or not is_folder_name(path):
            return
        prefix = f"{REPLACED_PREFIX}{os.path.basename(path.rstrip('/'))}-"
        try:
            leftovers = any(n.startswith(prefix) for n in os.listdir(parent))
        except OSError:
            return
        if leftovers:
            self._stage(path)

    def flush(self) -> None:
        """Wait until every save and removal is done; raise the first error not yet seen."""
        for entry in list(self._dirs.values()):
            entry.mgr.wait()

    def close(self) -> None:
        """Flush, run queued removals, release the directories (their locks)."""
        with self._lock:
            entries, self._dirs = list(self._dirs.values()), {}
        errors = []
        for entry in entries:
            try:
                entry.mgr.close()
            except Exception as exc:  # noqa: BLE001 - close every directory, then raise the first error
                errors.append(exc)
        if errors:
            raise errors[0]
