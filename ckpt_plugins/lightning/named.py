"""Saves addressed by path (what Lightning's ``CheckpointIO`` gets), on top of the core.

INTERIM, until the core can commit a checkpoint under any folder name (request L-2 in
``docs/requests/lightning.md``): then this module becomes ``mgr.save(..., name=...)`` and
``mgr.delete(name)`` and goes away. It reuses the core as it is, adding no second copy of its
format, staging or commit protocol:

* Each parent directory gets one :class:`~ckpt_plugins.CheckpointManager` over a hidden folder
  ``<parent>/.ckpt-io``, so staging buffers are reused, in-flight saves are bounded and saves
  run in order on one writer. Each save uses the training step it is given (several saves may
  share one: ``overwrite=True``, and a committed folder never stays there long).
* A save commits there atomically (``step_<N>``, the core's protocol). From the save's
  ``on_commit`` (on the writer, in save order) the committed folder is renamed into place at the
  requested path, in the same file system. A folder already there is first moved into the
  hidden folder as ``.trash-*`` and removed after the new one is in place.
* The requested path is recorded in the manifest (``user_metadata["path"]``). A crash after the
  commit but before the rename leaves a committed ``step_<N>``; the next time this parent is
  used it is moved into place (the ``.trash-*`` copy is removed by the core's start-up cleanup).
* ``remove(path)`` waits for no one: while saves to this parent are in flight it is queued and
  runs on the writer after the last of them is placed, so a delete never overtakes a save.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.engine import SaveHandle

__all__ = ["NamedSaves", "STAGE_DIR"]

log = logging.getLogger(__name__)

STAGE_DIR = ".ckpt-io"


class _Stage:
    """One parent directory: its manager, what is in flight, removals waiting for it."""

    def __init__(self, parent: str, owner: "NamedSaves") -> None:
        self.parent = parent
        self.mgr = CheckpointManager(os.path.join(parent, STAGE_DIR), async_save=owner.async_save,
                                     max_pending=owner.max_pending, writer=owner.writer, on_error=owner.on_error,
                                     overwrite=True)
        self.owner = owner
        self.lock = threading.Lock()
        self.in_flight: dict[int, SaveHandle] = {}  # by save number (steps may repeat)
        self.removals: list[tuple[int, str]] = []  # (run once this save number is placed, path)
        self.count = 0
        for step in self.mgr.steps():  # committed but never moved into place: a crash did that
            self._place(self.mgr.path_for(step), recovering=True)

    def save(self, path: str, step: int, state: Any, user_metadata: dict[str, Any]) -> SaveHandle | None:
        with self.lock:
            self.count += 1
            number = self.count
        handle = self.mgr.save(step, state, user_metadata={**user_metadata, "path": os.path.basename(path)},
                               on_commit=lambda _step, staged: self._placed(number, staged))
        if handle is not None and not handle.done():
            with self.lock:
                self.in_flight[number] = handle
        return handle

    def remove(self, path: str) -> None:
        with self.lock:
            for number, handle in list(self.in_flight.items()):
                if handle.done():  # failed: its on_commit never ran
                    del self.in_flight[number]
            if self.in_flight:
                self.removals.append((max(self.in_flight), path))
                return
        self._delete(path)

    def close(self) -> None:
        try:
            self.mgr.close()
        finally:
            with self.lock:
                pending, self.removals, self.in_flight = self.removals, [], {}
            for _, path in pending:
                self._delete(path)

    # --- on the writer -------------------------------------------------------------------------
    def _placed(self, number: int, staged: str) -> None:
        self._place(staged)
        with self.lock:
            self.in_flight.pop(number, None)
            due = [p for after, p in self.removals if after <= number]
            self.removals = [(after, p) for after, p in self.removals if after > number]
        for path in due:
            self._delete(path)

    def _place(self, staged: str, recovering: bool = False) -> None:
        storage = self.mgr.storage
        name = self.mgr.layout.read_manifest(staged).user_metadata.get("path")
        if not isinstance(name, str) or not name or "/" in name:
            log.warning("%s has no target path in its manifest; removing it", staged)
            storage.remove_tree(staged)
            return
        target = storage.join(self.parent, name)
        old = None
        if storage.exists(target):
            old = storage.join(self.mgr.root, f".trash-{uuid.uuid4().hex[:12]}")
            storage.rename(target, old)
        storage.rename(staged, target)
        storage.fsync_dir(self.parent)
        storage.fsync_dir(self.mgr.root)
        if old is not None:
            storage.remove_tree(old)
        if recovering:
            log.warning("moved %s into place: the process that saved it stopped before doing so", target)

    def _delete(self, path: str) -> None:
        storage = self.mgr.storage
        if not storage.exists(path):
            return
        if storage.isdir(path):
            trash = storage.join(self.mgr.root, f".trash-{uuid.uuid4().hex[:12]}")
            storage.rename(path, trash)  # gone from view at once; a crash leaves hidden trash
            storage.fsync_dir(self.parent)
            storage.remove_tree(trash)
        else:
            storage.remove_file(path)
        log.debug("removed checkpoint %s", path)


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
        self._stages: dict[str, _Stage] = {}
        self._lock = threading.Lock()

    def _stage(self, path: str, create: bool = True) -> _Stage | None:
        parent = os.path.dirname(os.path.abspath(path)) if "://" not in path else path.rsplit("/", 1)[0]
        with self._lock:
            stage = self._stages.get(parent)
            if stage is None and create:
                stage = self._stages[parent] = _Stage(parent, self)
            return stage

    def save(self, path: str, step: int, state: Any, user_metadata: dict[str, Any]) -> SaveHandle | None:
        """Save ``state`` (of training step ``step``) as the folder ``path``, replacing what is
        there once committed."""
        return self._stage(path).save(path, step, state, user_metadata)

    def remove(self, path: str) -> None:
        """Remove the checkpoint at ``path``, after the saves in flight to its directory."""
        self._stage(path).remove(path)

    def recover(self, path: str) -> None:
        """Finish what a crashed process left in ``path``'s directory (if it has a stage folder)."""
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(os.path.join(parent, STAGE_DIR)):
            self._stage(path)

    def flush(self) -> None:
        """Wait until every save is committed and in place; raise the first error not yet seen."""
        for stage in list(self._stages.values()):
            stage.mgr.wait()

    def close(self) -> None:
        """Flush, run queued removals, release the stage folders (removed when empty)."""
        with self._lock:
            stages, self._stages = list(self._stages.values()), {}
        errors = []
        for stage in stages:
            try:
                stage.close()
            except Exception as exc:  # noqa: BLE001 - close every stage, then raise the first error
                errors.append(exc)
            try:
                os.rmdir(os.path.join(stage.parent, STAGE_DIR))
            except OSError:
                pass  # not empty (a failed save's leftovers) or not local: the next start cleans up
        if errors:
            raise errors[0]
