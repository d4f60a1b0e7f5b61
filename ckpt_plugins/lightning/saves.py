"""Saves addressed by path, as Lightning's ``CheckpointIO`` makes them: one file each, in order.

Each save is one file in the core's single-file format (:mod:`ckpt_plugins.files.single_file`),
built from the core's parts: the state is flattened without pickle, its tensors are copied into
reused host buffers (the core's stager, ``max_pending`` of them), and the core's persist engine
writes and commits the file on a background thread, in submission order. What this module adds is
what addressing by path needs:

* **The name is taken at once.** ``save`` puts a reservation marker at a new path before it
  returns, so Lightning's ``ModelCheckpoint``, which picks ``-vN`` names by checking what exists,
  never hands the same name to two saves; the file is then written in place. An existing path
  (``last.ckpt``) is written under a hidden name and renamed over it.
* **A load waits for the save of its path.** Saves in flight are listed process-wide
  (:func:`wait_for`), so a new ``Trainer`` (another plugin) loading a path this process is still
  writing gets the committed file.
* **A removal never overtakes a save**: it is queued on the writer behind every save before it.
* **Nothing outlives the work.** The writer thread ends when its queue is empty; ``close`` also
  frees the staging memory. No directory lock is taken (Lightning owns the directory's names).
  Pickling keeps only the options: a copy builds its own writer when it first saves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from ckpt_plugins.files.single_file import remove_stale_temp_files, reserve, write_single_file
from ckpt_plugins.persist import exit_hooks
from ckpt_plugins.persist.engine import PersistEngine, SaveHandle
from ckpt_plugins.persist.stager import HostStager
from ckpt_plugins.persist.writer_process import ProcessWriter
from ckpt_plugins.storage import Storage, open_storage
from ckpt_plugins.storage.direct_io import direct_io_enabled
from ckpt_plugins.tree.codec import flatten_state

__all__ = ["PathSaves", "in_flight", "wait_for"]

log = logging.getLogger(__name__)

_IN_FLIGHT: dict[str, SaveHandle] = {}  # absolute path -> its save still being written, process-wide
_IN_FLIGHT_LOCK = threading.Lock()
_CLEANED: set[str] = set()  # directories whose leftovers this process has removed


def _key(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def in_flight(path: str | os.PathLike) -> SaveHandle | None:
    """The save of ``path`` this process is still writing, if any."""
    with _IN_FLIGHT_LOCK:
        return _IN_FLIGHT.get(_key(os.fspath(path)))


def wait_for(path: str | os.PathLike) -> None:
    """Return once no save of ``path`` is in flight in this process; raise that save's error."""
    handle = in_flight(path)
    if handle is not None:
        handle.wait()


def _storage(path: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    parent = path.rstrip("/").rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))
    return open_storage(parent, storage_options)[0]


class PathSaves:
    """Path-addressed saves of one plugin (see the module docstring).

    Args:
        async_save: write in the background; ``save`` returns once the state is copied.
        max_pending: saves in flight at once (staging buffers); a further save waits.
        writer: ``"thread"`` or ``"process"`` (tensor data written by a separate process).
        on_error: ``"raise"``: a failed background save raises at the next call; ``"warn"``: logged.
    """

    def __init__(
        self, *, async_save: bool = True, max_pending: int = 1, writer: str = "thread", on_error: str = "raise"
    ) -> None:
        self.async_save, self.max_pending, self.writer, self.on_error = async_save, max_pending, writer, on_error
        self._engine: PersistEngine | None = None
        self._stager: HostStager | None = None
        self._process: ProcessWriter | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("async_save", "max_pending", "writer", "on_error")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _parts(self) -> tuple[PersistEngine, HostStager]:
        with self._lock:
            if self._engine is None:
                self._stager = HostStager(self.max_pending, shared=self.writer == "process")
                if self.writer == "process":
                    self._process = ProcessWriter(direct_io_enabled(), self._stager)
                self._engine = PersistEngine(
                    async_save=self.async_save,
                    name="ckpt-lightning-writer",
                    on_error=self.on_error,
                    stop_when_idle=True,
                )
                exit_hooks.register(self)
            return self._engine, self._stager  # type: ignore[return-value]

    def save(
        self,
        path: str,
        step: int,
        state: Any,
        user_metadata: dict[str, Any],
        storage_options: Mapping[str, Any] | None = None,
        written: list[Any] | None = None,
    ) -> SaveHandle:
        """Save ``state`` as the file ``path`` (replacing what is there once committed);
        ``storage_options`` for a URL ``path`` go to its fsspec file system only; ``written``
        gets the file's size and xxh3 (a ``FileRecord``) appended once it is written.

        Raises:
            UnsupportedStateError: ``state`` holds something that cannot be stored without pickle.
            SaveError: an earlier background save failed (``on_error="raise"``).
        """
        if self._engine is not None:
            self._engine.take_error(refuse=True)  # the core's on_error rule
        flat = flatten_state(state)
        storage = _storage(path, storage_options)
        engine, stager = self._parts()
        earlier = in_flight(path)
        if earlier is not None and earlier not in engine.pending():
            earlier.wait()  # another plugin's save of the same name commits first (ours: the queue orders them)
        parent = os.path.dirname(_key(path)) if "://" not in path else path.rstrip("/").rsplit("/", 1)[0]
        storage.makedirs(parent)
        if parent not in _CLEANED:
            _CLEANED.add(parent)
            remove_stale_temp_files(storage, parent)
        t0 = time.perf_counter()
        slot = stager.acquire(block=True)
        assert slot is not None  # a blocking acquire always gets one
        try:
            staged = stager.stage(slot, {f"state/{k}": v for k, v in flat.tensors.items()})
            staged.wait()
        except BaseException:
            stager.release(slot)
            raise
        reserved = reserve(storage, path)
        handle = SaveHandle(step, path)
        handle.stats.update(step=step, bytes=float(sum(t.numel() * t.element_size() for t in staged.tensors.values())))
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT[_key(path)] = handle
        info = {"step": step, "user_metadata": user_metadata}
        tensors = {k[len("state/") :]: v for k, v in staged.tensors.items()}

        def job(h: SaveHandle) -> str:
            h._staged.set_result(None)
            start = time.perf_counter()
            try:
                write = None
                if self._process is not None:
                    write = lambda p, t, m: self._process.write(p, t, m, slot)  # noqa: E731
                record = write_single_file(
                    storage,
                    path,
                    flat.tree,
                    tensors,
                    info,
                    direct_io=direct_io_enabled(),
                    in_place=reserved,
                    write_tensors=write,
                )
                h.stats["persist_s"] = time.perf_counter() - start
                if written is not None:
                    written.append(record)
                return path
            except BaseException:
                if reserved and storage.exists(path):
                    storage.remove_file(path)  # the name is free again: nothing was committed
                raise
            finally:
                stager.release(slot)
                with _IN_FLIGHT_LOCK:
                    if _IN_FLIGHT.get(_key(path)) is h:
                        del _IN_FLIGHT[_key(path)]

        handle.stats["stall_s"] = time.perf_counter() - t0
        engine.submit(handle, job)
        if not self.async_save:
            engine.report(handle)
        return handle

    def remove(self, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Remove the checkpoint at ``path`` after every save submitted before (queued, no wait)."""
        other = in_flight(path)
        if other is not None and (self._engine is None or other not in self._engine.pending()):
            other.wait()  # another plugin's save of this path
        storage = _storage(path, storage_options)

        def job(h: SaveHandle) -> str:
            h._staged.set_result(None)
            if storage.isdir(path):
                storage.remove_tree(path)  # a checkpoint folder (what earlier versions wrote)
            elif storage.exists(path):
                storage.remove_file(path)
            log.debug("removed checkpoint %s", path)
            return path

        engine, _ = self._parts()
        handle = engine.submit(SaveHandle(-1, path), job)
        if not self.async_save:
            engine.report(handle)

    def flush(self) -> None:
        """Wait for every save and removal; raise the first error not yet reported."""
        if self._engine is not None:
            self._engine.flush()
            self._engine.take_error()

    def close(self) -> None:
        """Flush, stop the writer, free the staging memory. Raises a pending save error."""
        with self._lock:
            engine, process, self._engine, self._process, self._stager = self._engine, self._process, None, None, None
        if engine is None:
            return
        exit_hooks.unregister(self)
        try:
            engine.shutdown()
            if process is not None:
                process.close()
        finally:
            engine.take_error()
