"""A writer process: tensor files written by another process, reading staged shared memory.

Why: on a machine with few cores, the writer thread shares the GIL with training. Writing and
hashing release the GIL for large buffers, but the Python-level work around them does not. A
separate process has its own interpreter. A staging slot's arena is a few blocks of shared
memory (``share_memory_``, one per file, :mod:`.snapshot`); the child receives them once, when
they are allocated, and keeps them mapped, so each file written afterwards costs one small message
of offsets, not bytes and not one shared-memory segment per tensor.

The parent's writer thread still runs the job (commit, retention, callbacks); only
``write_tensor_file`` moves to the child. The child is started with the ``spawn`` method (safe
with threads and CUDA), which costs a fresh interpreter importing torch and, as spawn does, the
main script's imports: seconds (8 s for a transformers script on 2 busy cores). So it is started
as soon as the writer is built, in the background, and nothing waits for it: until it reports
ready, files are written by the writer thread itself (the same ``write_tensor_file`` on the same
staged buffers, as with ``writer="thread"``), and closing before it is ready stops it instead of
waiting; a short run never pays for the start-up. It is stopped on close. Local directories only. A child that
dies (killed, out of memory) is not replaced behind the user's back: the write raises
:class:`~ckpt_plugins.errors.WriterError`, which fails every pending save of the manager and
refuses the later ones (see :mod:`.engine`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.multiprocessing as mp

from ckpt_plugins.errors import SaveError, WriterError
from ckpt_plugins.files.tensor_file import FileRecord, write_tensor_file
from ckpt_plugins.persist.stager import HostStager
from ckpt_plugins.storage.local import LocalStorage

__all__ = ["ProcessWriter"]

log = logging.getLogger(__name__)


def _serve(requests: Any, results: Any, direct_io: bool) -> None:
    from ckpt_plugins.files.tensor_file import write_tensor_file
    from ckpt_plugins.storage import LocalStorage

    torch.set_num_threads(1)
    storage = LocalStorage()
    arenas: dict[int, dict[str, torch.Tensor]] = {}  # slot -> its staging blocks, mapped once
    results.put(("ready", None))
    while True:
        item = requests.get()
        if item is None:
            return
        if item[0] == "arena":
            _, slot, memory = item
            arenas[slot] = memory  # {group: block}; the slot's previous blocks are unmapped here
            continue
        _, path, payload, metadata = item
        tensors: Any = None
        try:
            if item[0] == "views":
                slot, entries = payload
                blocks = arenas[slot]
                tensors = {
                    key: blocks[group][offset : offset + nbytes].view(dtype).view(shape)
                    for key, dtype, shape, group, offset, nbytes in entries
                }
            else:
                tensors = payload
            record = write_tensor_file(storage, path, tensors, metadata, direct_io=direct_io)
            results.put(("ok", (record.size, record.xxh3_64)))
        except OSError as exc:
            results.put(("oserror", (exc.errno, exc.strerror or str(exc), path)))
        except Exception as exc:
            results.put(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            tensors = payload = None  # drop the child's views before the next request


class ProcessWriter:
    """Writes tensor files in a child process; one request at a time, in order."""

    def __init__(self, direct_io: bool = True, stager: HostStager | None = None) -> None:
        self._direct_io = direct_io
        self._stager = stager
        self._sent: dict[int, int] = {}  # slot -> arena generation the child holds
        self._proc: Any = None  # a spawn-context Process
        self._answered = 0  # requests the current child has answered
        self._ready = False  # the current child has finished its start-up
        self._died: WriterError | None = None
        self._lock = threading.Lock()
        self._start()  # now, in the background: its start-up overlaps whatever comes before the first save

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._requests = ctx.Queue()
        self._results = ctx.Queue()
        self._proc = ctx.Process(
            target=_serve,
            args=(self._requests, self._results, self._direct_io),
            name="ckpt-writer-process",
            daemon=True,
        )
        self._proc.start()
        self._answered = 0
        self._sent = {}
        self._ready = False
        log.info(
            "starting writer process (pid %d); files are written by the writer thread until it is ready", self._proc.pid
        )

    def _check_ready(self, path: str | None, timeout: float | None = 0) -> bool:
        """Whether the child has finished its start-up, waiting up to ``timeout`` seconds (None:
        until it is ready or dead). Raises its WriterError when it died first. Lock held."""
        while not self._ready:
            try:
                kind, _ = self._results.get(timeout=1.0 if timeout is None else min(timeout, 1.0))
            except queue.Empty:
                if not self._proc.is_alive():
                    raise self._death(path) from None
                if timeout is not None:
                    timeout -= 1.0
                    if timeout < 0:
                        return False
                continue
            self._ready = kind == "ready"
            log.info("writer process (pid %d) is ready", self._proc.pid)
        return True

    def wait_ready(self) -> None:
        """Block until the child has started (raises its WriterError if it died first)."""
        with self._lock:
            if self._died is not None:
                raise self._died
            self._check_ready(None, None)

    def write(
        self,
        path: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        slot: int | None = None,
    ) -> FileRecord:
        """Write ``tensors`` (in shared memory) to ``path`` in the child; raise its error here.

        Tensors staged in ``slot``'s arena travel as offsets into it (the arena itself is sent
        once per allocation); others as shared-memory tensors, one segment each.
        """
        with self._lock:
            if self._died is not None:
                raise self._died
            if self._proc is None:
                self._start()
            elif not self._proc.is_alive():
                raise self._death(path)
            if not self._check_ready(path):
                return write_tensor_file(LocalStorage(), path, tensors, metadata, direct_io=self._direct_io)
            entries = self._arena_entries(slot, tensors)
            arena = self._stager.arena(slot) if entries is not None and self._stager and slot is not None else None
            if arena is not None and slot is not None:
                if self._sent.get(slot) != arena.generation:
                    self._requests.put(("arena", slot, arena.memory))
                    self._sent[slot] = arena.generation
                self._requests.put(("views", path, (slot, entries), dict(metadata or {})))
            else:
                self._requests.put(("tensors", path, dict(tensors), dict(metadata or {})))
            while True:
                try:
                    kind, payload = self._results.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._proc.is_alive():
                        raise self._death(path) from None
        self._answered += 1
        if kind == "ok":
            return FileRecord(size=payload[0], xxh3_64=payload[1])
        if kind == "oserror":
            raise OSError(*payload)
        raise SaveError(f"the writer process failed to write {path}: {payload}")

    def _death(self, path: str | None) -> WriterError:
        """The error for a child found dead (kept: every later write raises it too)."""
        code = self._proc.exitcode if self._proc is not None else None
        self._proc = None
        # Nobody reads the queues any more: never block exit on their feeder threads.
        self._requests.cancel_join_thread()
        self._results.cancel_join_thread()
        hint = ""
        if not self._answered:
            hint = (
                "; it died before writing anything: with writer='process' the main "
                "script must be import-safe (training code under `if __name__ == "
                "'__main__':`), because the writer is started with spawn and imports it"
            )
        where = f"while writing {path}" if path else "while starting"
        self._died = WriterError(
            f"the writer process died (exit code {code}) {where}{hint}; "
            "saves still pending failed with it, and this manager accepts no more saves"
        )
        return self._died

    def _arena_entries(self, slot: int | None, tensors: Mapping[str, torch.Tensor]) -> list[tuple[Any, ...]] | None:
        """(key, dtype, shape, group, offset, nbytes) of each tensor inside the slot's arena, or
        None when one is not in it."""
        arena = self._stager.arena(slot) if self._stager is not None and slot is not None else None
        if arena is None:
            return None
        entries: list[tuple[Any, ...]] = []
        for key, tensor in tensors.items():
            where = arena.locate(tensor) if tensor.is_contiguous() else None
            if where is None:
                return None
            entries.append((key, tensor.dtype, tuple(tensor.shape), *where, tensor.numel() * tensor.element_size()))
        return entries

    def close(self) -> None:
        """Stop the child: it finishes the request in hand; one still starting is stopped at once."""
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                if self._ready or self._check_ready(None):
                    self._requests.put(None)
                    self._proc.join(timeout=30)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(timeout=30)
                    self._requests.cancel_join_thread()  # nobody reads them any more
                    self._results.cancel_join_thread()
            self._proc = None
