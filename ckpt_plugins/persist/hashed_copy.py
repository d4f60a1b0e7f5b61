"""Copy tensors into a staging block and checksum the block on a second thread, during the copy.

A tensor file's checksum (xxh3 of the file) used to be one more pass over the whole state on
the background writer, after the copy: about 20 ms of CPU per 500 MB here, taken from training
on a machine with few cores while the save persists. Hashing each piece while it is copied, on
the copying thread, only moves that time into the stall (xxh3 is bound by computation, not by
memory, so a cache-hot piece hashes no faster). Here the copy runs on the caller's thread (one
``memmove`` per piece, which on its own saturates memory bandwidth) while a helper thread hashes
the pieces already copied, a few MiB behind, from the cache they were just written to: while
``save()`` blocks, training has nothing to run on the second core, so the hash is free there.
Both ``memmove`` (ctypes) and xxh3 release the GIL.

The pieces are hashed in block order, which is the file's order (the stager lays a file's
tensors out in :func:`~ckpt_plugins.files.tensor_file.file_order`), so the digest is the
checksum (:mod:`~ckpt_plugins.files.checksum`) of the header followed by the block: exactly the
bytes :func:`~.tensor_file.write_tensor_file` writes (it checks that before trusting the digest).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import torch

from ckpt_plugins.files.checksum import FileHasher

__all__ = ["PIECE", "copy_and_hash", "copy_pieces", "holds_own_bytes"]

PIECE = 4 << 20
"""Copy in pieces this large and let the hasher follow piece by piece: small enough to still be
in the (shared, last-level) cache when hashed, large enough that the hand-over costs nothing."""


class _Progress:
    """How many bytes of the block are copied; the hasher waits on it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done = 0
        self._wanted = 0
        self._failed = False

    def advance(self, done: int) -> None:
        with self._cond:
            self._done = done
            if done >= self._wanted:
                self._cond.notify()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify()

    def wait_for(self, end: int) -> bool:
        """Block until ``end`` bytes are copied; False if the copy failed."""
        with self._cond:
            self._wanted = end
            while self._done < end and not self._failed:
                self._cond.wait()
            return not self._failed


def copy_and_hash(pairs: list[tuple[torch.Tensor, torch.Tensor]], head: bytes, block: torch.Tensor) -> str:
    """Copy each ``(dst, src)`` (``dst``: views that fill ``block`` in order) and return the xxh3
    of ``head`` followed by ``block``'s bytes, hashed on a helper thread as the copy advances."""
    hasher = FileHasher(head)
    base, total = block.data_ptr(), block.numel()
    progress = _Progress()
    errors: list[BaseException] = []

    def hash_behind() -> None:
        try:
            view = memoryview((ctypes.c_ubyte * total).from_address(base)).cast("B")
            for start in range(0, total, PIECE):
                end = min(start + PIECE, total)
                if not progress.wait_for(end):
                    return
                hasher.update(view[start:end])
        except BaseException as exc:  # reported by the copying thread
            errors.append(exc)

    thread = threading.Thread(target=hash_behind, name="ckpt-stage-hash", daemon=True)
    thread.start()
    try:
        copy_pieces(pairs, lambda end: progress.advance(end - base))
        progress.advance(total)
    except BaseException:
        progress.fail()
        raise
    finally:
        thread.join()
    if errors:
        raise errors[0]
    return hasher.hexdigest()


def copy_pieces(pairs: list[tuple[torch.Tensor, torch.Tensor]], copied: Callable[[int], None] | None = None) -> None:
    """Copy each ``(dst, src)`` by ``memmove`` in ``PIECE``-sized pieces on this thread (torch's
    ``copy_`` for what a ``memmove`` cannot copy: other layouts, dtypes, devices); after each
    piece, ``copied(address just past it)``; without ``copied``, one ``memmove`` per tensor.

    ``memmove`` rather than ``copy_``: glibc's copies at full speed into a destination that is
    not 64-byte aligned (a tensor after an odd-sized one in a file), where torch's vectorised
    copy is 20-25 % slower (measured in docs/memory_tier.md), and it releases the GIL."""
    for dst, src in pairs:
        nbytes = dst.numel() * dst.element_size()
        if not nbytes:
            continue
        target = dst.data_ptr()
        if not _plain_bytes(src, dst):
            dst.copy_(src.detach())  # torch resolves layouts and lazy conjugation
            if copied is not None:
                copied(target + nbytes)
            continue
        source = src.data_ptr()
        piece = PIECE if copied is not None else nbytes
        for pos in range(0, nbytes, piece):
            n = min(piece, nbytes - pos)
            ctypes.memmove(target + pos, source + pos, n)
            if copied is not None:
                copied(target + pos + n)


def _plain_bytes(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether ``src``'s memory holds ``dst``'s bytes as they are (same shape and dtype, and
    :func:`holds_own_bytes`), so that a ``memmove`` copies it."""
    return src.shape == dst.shape and src.dtype == dst.dtype and holds_own_bytes(src)


def holds_own_bytes(tensor: torch.Tensor) -> bool:
    """Whether a tensor's memory holds exactly the bytes its values are stored as: contiguous, on
    the CPU, with no lazy conjugation or negation (so it may be copied as raw bytes)."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()
