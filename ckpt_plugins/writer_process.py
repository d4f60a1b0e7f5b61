"""A writer process: tensor files written by another process, reading staged shared memory.

Why: on a machine with few cores, the writer thread shares the GIL with training. Writing and
hashing release the GIL for large buffers, but the Python-level work around them does not. A
separate process has its own interpreter. Staging buffers are allocated in shared memory
(``share_memory_``), so handing a staged state to the writer process passes file descriptors,
not bytes.

The parent's writer thread still runs the job (commit, retention, callbacks); only
``write_tensor_file`` moves to the child. The child is started on first use with the ``spawn``
method (safe with threads and CUDA) and stopped on close. Local directories only.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.multiprocessing as mp

from .errors import SaveError
from .tensor_file import FileRecord

__all__ = ["ProcessWriter"]

log = logging.getLogger(__name__)


def _serve(requests: Any, results: Any, direct_io: bool) -> None:
    from .storage import LocalStorage
    from .tensor_file import write_tensor_file

    torch.set_num_threads(1)
    storage = LocalStorage()
    while True:
        item = requests.get()
        if item is None:
            return
        path, tensors, metadata = item
        try:
            record = write_tensor_file(storage, path, tensors, metadata, direct_io=direct_io)
            results.put(("ok", (record.size, record.xxh3_64)))
        except OSError as exc:
            results.put(("oserror", (exc.errno, exc.strerror or str(exc), path)))
        except Exception as exc:  # noqa: BLE001 - sent back to the parent, raised there
            results.put(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            del tensors


class ProcessWriter:
    """Writes tensor files in a child process; one request at a time, in order."""

    def __init__(self, direct_io: bool = True) -> None:
        self._direct_io = direct_io
        self._proc = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._requests = ctx.Queue()
        self._results = ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(self._requests, self._results, self._direct_io),
                                 name="ckpt-writer-process", daemon=True)
        self._proc.start()
        log.info("started writer process (pid %d)", self._proc.pid)

    def write(self, path: str, tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> FileRecord:
        """Write ``tensors`` (in shared memory) to ``path`` in the child; raise its error here."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            self._requests.put((path, dict(tensors), dict(metadata or {})))
            while True:
                try:
                    kind, payload = self._results.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._proc.is_alive():
                        code = self._proc.exitcode
                        self._proc = None
                        # Nobody reads the queues any more: never block exit on their feeder threads.
                        self._requests.cancel_join_thread()
                        self._results.cancel_join_thread()
                        raise SaveError(f"the writer process died (exit code {code}) while writing {path}") from None
        if kind == "ok":
            return FileRecord(size=payload[0], xxh3_64=payload[1])
        if kind == "oserror":
            raise OSError(*payload)
        raise SaveError(f"the writer process failed to write {path}: {payload}")

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                self._requests.put(None)
                self._proc.join(timeout=30)
                if self._proc.is_alive():
                    self._proc.kill()
            self._proc = None
