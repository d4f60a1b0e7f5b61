"""Persist engine: runs save jobs in order on one background writer, and never loses an error.

* One writer thread and a FIFO queue: saves commit in the order they were made, and the retention
  deletions a save triggers run inside its job, after its commit, so a delete can never overtake
  the save it follows.
* Every job has a :class:`SaveHandle` with ``wait()``, ``done()``, ``exception()``; ``staged()``
  tells when the state has been copied (what overlap mode waits for).
* A failed job's error is kept until it is reported: by ``handle.wait()``, or else by the next
  ``raise_pending_error()`` (the manager calls it at the next save, wait and close).
* A failure of the writer itself (the thread raising outside a job, or a job raising
  :class:`~ckpt_plugins.errors.WriterError`, e.g. the writer process died) fails every pending
  handle with one :class:`WriterError`, and :meth:`PersistEngine.submit` refuses new jobs with it:
  nothing is left waiting for a writer that is gone (``wait()``, ``close()`` and interpreter exit
  return).

Synchronous managers run jobs on the caller's thread through the same path, so both modes share
one implementation of ordering and error handling.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from ckpt_plugins.errors import SaveError, WriterError

__all__ = ["PersistEngine", "SaveHandle"]

log = logging.getLogger(__name__)


class SaveHandle:
    """The result of one save: wait for it, poll it, or read its error."""

    def __init__(self, step: int, path: str) -> None:
        self.step = step
        self.path = path
        self._staged: Future[None] = Future()
        self._durable: Future[str] = Future()
        self._reported = False
        self.stats: dict[str, float] = {}  # stall_s and bytes at save(); persist_s at the commit

    def add_done_callback(self, fn: Callable[[SaveHandle], None]) -> None:
        """Call ``fn(handle)`` once the save has committed or failed (at once if it has); the
        handle's ``stats`` are complete by then."""
        self._durable.add_done_callback(lambda _future: fn(self))

    def wait(self, timeout: float | None = None) -> str:
        """Block until the checkpoint is committed; return its path or raise the save's error."""
        try:
            return self._durable.result(timeout)
        except BaseException:
            if self._durable.done():
                self._reported = True
            raise

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until the state has been copied out of the live tensors."""
        self._staged.result(timeout)

    def done(self) -> bool:
        return self._durable.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._durable.exception(timeout)
        if exc is not None:
            self._reported = True
        return exc

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._durable.exception() else "committed")
        return f"SaveHandle(step={self.step}, path={self.path!r}, {state})"


def _unsettled(handle: SaveHandle) -> bool:
    """Whether the engine still tracks ``handle``: in flight, or failed with no one told yet."""
    if not handle.done():
        return True
    return not handle._reported and handle._durable.exception() is not None


class _WriterThread(threading.Thread):
    """The engine's daemon writer thread. ``stop()`` finishes the queued jobs, then ends it: what
    code that tidies up stray daemon threads calls (Lightning's test harness does)."""

    def __init__(self, engine: PersistEngine) -> None:
        super().__init__(target=engine._loop, name=engine._name, daemon=True)
        self._engine = engine

    def stop(self) -> None:
        self._engine.shutdown()


class PersistEngine:
    """Ordered execution of save jobs, on a writer thread (async) or inline (sync).

    ``stop_when_idle``: the writer thread ends whenever its queue is empty, and the next job
    starts a new one, so an engine that saved once leaves no thread behind (Lightning's
    ``CheckpointIO``, which is not told when the user's work is over).
    """

    def __init__(
        self,
        *,
        async_save: bool,
        name: str = "ckpt-writer",
        writer_nice: int = 0,
        on_error: str = "raise",
        stop_when_idle: bool = False,
    ) -> None:
        self.async_save = async_save
        self.stop_when_idle = stop_when_idle
        self.on_error = on_error
        self.writer_nice = writer_nice
        self._queue: queue.Queue[tuple[SaveHandle, Callable[[SaveHandle], str]] | None] = queue.Queue()
        self._handles: list[SaveHandle] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._name = name
        self._failure: WriterError | None = None
        self._failure_reported = False

    @property
    def failure(self) -> WriterError | None:
        """The writer's own failure, once it happened (then no job runs any more)."""
        return self._failure

    def submit(self, handle: SaveHandle, job: Callable[[SaveHandle], str]) -> SaveHandle:
        """Queue ``job`` (which must mark ``handle`` staged) and return the handle.

        Raises:
            WriterError: the writer failed earlier; no job can run.
        """
        with self._lock:
            if self._failure is not None:
                self._failure_reported = True
                raise self._failure
            self._handles = [h for h in self._handles if _unsettled(h)]  # bounded: a long run saves often
            self._handles.append(handle)
            if self.async_save:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = _WriterThread(self)
                    self._thread.start()
                self._queue.put((handle, job))  # under the lock: _fail() drains what is queued
        if not self.async_save:
            self._run(handle, job)
        return handle

    def pending(self) -> list[SaveHandle]:
        with self._lock:
            return [h for h in self._handles if not h.done()]

    def flush(self) -> None:
        """Wait until every submitted job has finished (successfully or not)."""
        for handle in list(self._handles):
            try:
                handle._durable.exception()
            except BaseException:
                pass

    def raise_pending_error(self, *, refuse: bool = False) -> None:
        """Raise the first error no one has seen yet (as SaveError, cause chained); then the
        writer's failure if it was not reported yet, or always when ``refuse`` (a new save)."""
        with self._lock:
            for handle in self._handles:
                if handle.done() and not handle._reported and handle._durable.exception() is not None:
                    handle._reported = True
                    exc = handle._durable.exception()
                    if exc is self._failure:
                        self._failure_reported = True
                    if isinstance(exc, SaveError):
                        raise exc
                    raise SaveError(f"saving step {handle.step} failed: {exc}") from exc
            if self._failure is not None and (refuse or not self._failure_reported):
                self._failure_reported = True
                raise self._failure

    def take_error(self, *, distributed: bool = False, refuse: bool = False) -> str | None:
        """Apply ``on_error`` to an unseen error: raise it (one process), log it (``"warn"``), or
        return its text for the other ranks to hear of (``distributed``). With ``refuse`` (a new
        save) a failed writer's error is raised (returned) whatever ``on_error`` says."""
        try:
            self.raise_pending_error(refuse=refuse)
        except WriterError as exc:
            if not distributed:
                raise
            return str(exc)
        except SaveError as exc:
            if self.on_error == "warn":
                log.warning("a checkpoint save failed and on_error='warn': %s", exc)
                return None
            if not distributed:
                raise
            return str(exc)
        return None

    def report(self, handle: SaveHandle, *, distributed: bool = False) -> None:
        """Wait for ``handle`` (a synchronous save) and apply ``on_error`` to its failure."""
        try:
            handle.wait()
        except Exception as exc:
            if self.on_error == "warn":
                log.warning("saving step %d failed and on_error='warn': %s", handle.step, exc)
            elif not distributed:
                raise

    def shutdown(self) -> None:
        """Flush and stop the writer thread."""
        self.flush()
        with self._lock:  # the loop decides to end under this lock too: exactly one None per live thread
            thread = self._thread
            if thread is not None and thread.is_alive():
                self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None

    def _loop(self) -> None:
        try:
            self._lower_priority()
            while True:
                if self.stop_when_idle:
                    with self._lock:
                        item = None if self._queue.empty() else self._queue.get_nowait()
                        if item is None:
                            self._thread = None
                            return
                else:
                    item = self._queue.get()
                if item is None:
                    return
                self._run(*item)
                if self._failure is not None:
                    return
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The writer cannot go on: fail every pending handle with one WriterError, refuse new jobs."""
        failure = (
            exc
            if isinstance(exc, WriterError)
            else WriterError(
                f"the checkpoint writer failed ({type(exc).__name__}: {exc}); saves still pending failed with "
                "it, and this manager accepts no more saves: close it and open a new one"
            )
        )
        if failure is not exc:
            failure.__cause__ = exc
        with self._lock:
            if self._failure is None:
                self._failure = failure
                log.error("%s", failure)
            pending = [h for h in self._handles if not h.done()]
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        for handle in pending:
            if not handle._staged.done():
                handle._staged.set_exception(self._failure)
            if not handle._durable.done():
                handle._durable.set_exception(self._failure)

    def _lower_priority(self) -> None:
        """Optionally give the writer thread a higher nice value (Linux schedules threads one by
        one). Off by default: on 2 cores ``make bench`` measured a smaller dip in training speed
        while persisting but a persist window ~3x longer and more training time lost per save
        (the niced writer can be descheduled while it holds the GIL)."""
        if not self.writer_nice or not hasattr(os, "setpriority"):
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.writer_nice)
        except OSError as exc:  # not permitted here: keep the default priority
            log.debug("could not lower the writer thread's priority: %s", exc)

    def _run(self, handle: SaveHandle, job: Callable[[SaveHandle], str]) -> None:
        try:
            path = job(handle)
        except BaseException as exc:
            if isinstance(exc, WriterError):
                self._fail(exc)  # this handle too
                return
            if not handle._staged.done():
                handle._staged.set_exception(exc)
            log.error("saving step %d failed: %s", handle.step, exc)
            handle._durable.set_exception(exc)
        else:
            if not handle._staged.done():
                handle._staged.set_result(None)
            handle._durable.set_result(path)
