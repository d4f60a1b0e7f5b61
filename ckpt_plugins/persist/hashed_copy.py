"""Copy tensors into staging memory on several threads, checksumming each chunk as it is copied.

A save blocks training for one copy of the state (the stall). Measured on the 2-core benchmark
machine for its 517 MiB state (docs/benchmarks.md): one ``memmove`` per tensor took 83 ms (below
glibc's non-temporal threshold its stores go through the cache at one core's pace), that copy
with a helper thread hashing behind it 85 ms, and two threads that each copy one 16 MiB chunk and
then hash it from the cache it was just written to, 61 ms; torch's two-thread ``copy_`` alone
took 43-48 ms. A file's checksum is over fixed chunks (:mod:`~ckpt_plugins.files.checksum`), so
chunks hash independently, in any order, on any thread: the copy and the hash then share every
core while ``save()`` blocks, when training has nothing to run on them.

Work is claimed one chunk at a time from a shared counter rather than split in fixed halves:
when another process holds a core, the thread on it takes fewer chunks and the others do the
rest, so a copy waits at most for the one chunk a descheduled thread holds. (Fixed halves are why
the copy had left ``Tensor.copy_``, whose parallel loops took 260-600 ms on 2 busy cores.)
``threads=1`` keeps a copy on its caller's thread alone: a copy that runs in the background
beside training (overlap mode) must not take training's cores.

A copy without a checksum (:func:`copy_pieces`) uses streaming (non-temporal) stores where the
compiled :mod:`~ckpt_plugins.persist._stream_copy` is present: its destination is memory last
written a save or more ago, not in cache, and an ordinary store would first read every line of it
from memory. A copy with a checksum keeps ordinary stores, so that the chunk it hashes next is in
cache. Without the compiled part every copy is ``memmove``.

``memmove`` (ctypes), the streaming copy and xxh3 all release the GIL. The digest of the header
followed by the block is exactly the checksum of the bytes
:func:`~ckpt_plugins.files.tensor_file.write_tensor_file` writes (it checks that before trusting
the digest).
"""

from __future__ import annotations

import bisect
import ctypes
import os
import queue
import threading
from collections.abc import Callable

import torch
import xxhash

from ckpt_plugins.files.checksum import CHUNK, combine_chunks, cores

_ByteCopy = Callable[[int, int, int], object]
_MEMMOVE: _ByteCopy = ctypes.memmove
STREAMING_COPY: _ByteCopy | None
try:
    from ckpt_plugins.persist._stream_copy import copy as STREAMING_COPY
except ImportError:  # not compiled here (setup.py builds it where a C compiler is present)
    STREAMING_COPY = None
"""The streaming-store copy ``(dst, src, nbytes)`` that :func:`copy_pieces` uses, or ``None``
where it is not compiled (then ``memmove``). Tests and benchmarks may set it to ``None``."""

__all__ = ["MAX_THREADS", "PIECE", "STREAMING_COPY", "copy_and_hash", "copy_pieces", "copy_threads", "holds_own_bytes"]

PIECE = 4 << 20
"""The unit of work a thread claims in a copy without a checksum (about 0.4 ms of copying here):
small enough that the threads finish together, large enough that claiming costs nothing next to
it. A copy with a checksum claims whole checksum chunks (16 MiB): each is copied and then hashed
while still in the cache."""

MAX_THREADS = 4
"""At most this many copying threads: a few saturate a socket's memory bandwidth; more only
contend for it."""

THREAD_NAME = "ckpt-stage-copy"


def copy_threads(threads: int | None = None) -> int:
    """How many threads a copy on the caller's behalf uses: ``threads``, or one per core (at
    most :data:`MAX_THREADS`)."""
    return max(1, threads if threads is not None else min(cores(), MAX_THREADS))


def copy_and_hash(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], head: bytes, block: torch.Tensor, threads: int | None = None
) -> str:
    """Copy each ``(dst, src)`` (``dst``: views that fill ``block``) and return the checksum of
    ``head`` followed by ``block``'s bytes, each chunk hashed by the thread that copied it."""
    runs = _Runs(pairs, block.data_ptr())
    total, size = block.numel(), len(head) + block.numel()
    view = memoryview((ctypes.c_ubyte * total).from_address(block.data_ptr())).cast("B") if total else None
    count = max(1, -(-size // CHUNK))  # an empty file is one empty chunk
    digests = [0] * count

    def chunk(i: int) -> None:
        lo, hi = i * CHUNK, min((i + 1) * CHUNK, size)  # in the file: header, then the block
        start, end = max(lo - len(head), 0), max(hi - len(head), 0)  # in the block
        runs.copy(start, end)
        hasher = xxhash.xxh3_64()
        if lo < len(head):
            hasher.update(head[lo : min(hi, len(head))])
        if view is not None and end > start:
            hasher.update(view[start:end])
        digests[i] = hasher.intdigest()

    _claim_all(count, chunk, copy_threads(threads))
    return combine_chunks(digests)


def copy_pieces(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int | None = None) -> None:
    """Copy each ``(dst, src)``: raw bytes by :data:`STREAMING_COPY` (else ``memmove``) in
    :data:`PIECE`-sized pieces claimed by ``threads`` threads (:func:`copy_threads`), what a byte
    copy cannot copy (other layouts, dtypes, devices) by torch's ``copy_`` first, on the caller's
    thread.

    A byte copy rather than ``copy_`` for the bytes: glibc's ``memmove`` copies at full speed into a
    destination that is not 64-byte aligned (a tensor after an odd-sized one in a file), where
    torch's vectorised copy is 20-25 % slower (measured in docs/memory_tier.md)."""
    runs = _Runs(pairs, 0, STREAMING_COPY or _MEMMOVE)
    pieces = [(pos, min(pos + PIECE, off + n)) for off, _, n in runs.runs for pos in range(off, off + n, PIECE)]
    _claim_all(len(pieces), lambda i: runs.copy(*pieces[i]), copy_threads(threads))


class _Runs:
    """The raw-byte copies of a list of pairs, as ``(destination offset from base, source address,
    bytes)`` sorted by destination, copyable by destination range; pairs a ``memmove`` cannot
    copy are copied by ``copy_`` when this is built."""

    def __init__(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], base: int, byte_copy: _ByteCopy = _MEMMOVE
    ) -> None:
        self.base, self._byte_copy = base, byte_copy
        runs = []
        for dst, src in pairs:
            nbytes = dst.numel() * dst.element_size()
            if not nbytes:
                continue
            if not _plain_bytes(src, dst):
                dst.copy_(src.detach())  # torch resolves layouts and lazy conjugation
                continue
            runs.append((dst.data_ptr() - base, src.data_ptr(), nbytes))
        self.runs = sorted(runs)
        self._starts = [off for off, _, _ in self.runs]

    def copy(self, start: int, end: int) -> None:
        """Copy every byte of the runs that falls in ``[start, end)`` (destination offsets)."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self.runs) and self.runs[i][0] < end:
            off, source, n = self.runs[i]
            lo, hi = max(off, start), min(off + n, end)
            if hi > lo:
                self._byte_copy(self.base + lo, source + lo - off, hi - lo)
            i += 1


def _claim_all(count: int, work: Callable[[int], None], threads: int) -> None:
    """Run ``work(i)`` for every ``i < count`` on the caller's thread and up to ``threads - 1``
    helpers (:class:`_Helpers`), each claiming the next ``i`` when free. Returns once every
    claimed item is done; raises the first error, after which nothing more is claimed."""
    job = _Job(count, work)
    if count > 1 and threads > 1:
        _HELPERS.lend(job, min(threads, count) - 1)
    job.claim_and_work()
    job.finish()


class _Job:
    """One copy's items and who is working on them. A helper that starts after every item is
    claimed does nothing, so the caller waits only for helpers that took an item: it cannot wait
    for a helper that never ran."""

    def __init__(self, count: int, work: Callable[[int], None]) -> None:
        self.count, self.work = count, work
        self._next = 0
        self._busy = 0  # helpers inside claim_and_work with an item
        self._cond = threading.Condition()
        self._errors: list[BaseException] = []

    def _claim(self) -> int | None:
        with self._cond:
            if self._errors or self._next >= self.count:
                return None
            self._next += 1
            return self._next - 1

    def claim_and_work(self, helper: bool = False) -> None:
        with self._cond:
            if helper:
                self._busy += 1
        try:
            while (i := self._claim()) is not None:
                self.work(i)
        except BaseException as exc:  # raised on the caller's thread by finish()
            with self._cond:
                self._errors.append(exc)
        finally:
            with self._cond:
                if helper:
                    self._busy -= 1
                self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()
            if self._errors:
                raise self._errors[0]


class _Helpers:
    """Copy threads kept for the life of the process (starting threads for every copy cost about
    0.3 ms of a 7 ms snapshot here); re-made in a forked child, where threads do not survive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[_Helper] = []

    def lend(self, job: _Job, n: int) -> None:
        with self._lock:
            while len(self._threads) < n:
                helper = _Helper(self)
                helper.start()
                self._threads.append(helper)
            for helper in self._threads[:n]:
                helper.jobs.put(job)

    def forget(self, helper: _Helper) -> None:
        with self._lock:
            if helper in self._threads:
                self._threads.remove(helper)

    def _after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]


class _Helper(threading.Thread):
    """One thread of :class:`_Helpers`. ``stop()`` ends it after the jobs already handed to it
    and waits for it; the pool starts a new one at the next copy that needs it. Harnesses that
    police threads a test leaves behind call ``stop()`` on daemon threads (Lightning's test suite
    does, and fails a test on a thread it cannot stop)."""

    def __init__(self, pool: _Helpers) -> None:
        super().__init__(name=THREAD_NAME, daemon=True)
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pool = pool

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            job.claim_and_work(helper=True)

    def stop(self) -> None:
        self._pool.forget(self)
        self.jobs.put(None)
        if self is not threading.current_thread():
            self.join()


_HELPERS = _Helpers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPERS._after_fork)


def _plain_bytes(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether ``src``'s memory holds ``dst``'s bytes as they are (same shape and dtype, and
    :func:`holds_own_bytes`), so that a ``memmove`` copies it."""
    return src.shape == dst.shape and src.dtype == dst.dtype and holds_own_bytes(src)


def holds_own_bytes(tensor: torch.Tensor) -> bool:
    """Whether a tensor's memory holds exactly the bytes its values are stored as: contiguous, on
    the CPU, with no lazy conjugation or negation (so it may be copied as raw bytes)."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()
