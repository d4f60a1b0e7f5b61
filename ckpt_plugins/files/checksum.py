"""File checksums that verify on every core: xxh3 of fixed 16 MiB chunks, combined.

A plain xxh3 of a whole file is one sequential pass, so verifying a large tensor file runs on
one core however many the machine has. Here a file's checksum is the xxh3 of the 8-byte xxh3
digests of its consecutive :data:`CHUNK`-byte chunks (the last one shorter; an empty file is one
empty chunk), written ``tree24:<16 hex digits>``. Writers compute it in the same single pass as
before (:class:`FileHasher`); a reader of a local, mapped file hashes the chunks on one thread
per core, each taking a contiguous run (xxh3 releases the GIL), so the pass that checks the bytes
is also the parallel read that faults them in (:func:`digest_buffer`).

Manifests written before this scheme hold plain whole-file digests (16 hex digits, no prefix);
:func:`hasher_like` and :func:`digest_buffer` with ``like=`` check those the old way, so old
checkpoints stay readable. A manifest with chunked digests is format version 4, which older
releases refuse with "upgrade ckpt_plugins" instead of calling the files damaged.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

import xxhash

__all__ = [
    "CHUNK",
    "DIGEST_PATTERN",
    "FileHasher",
    "combine_chunks",
    "cores",
    "digest_buffer",
    "hasher_like",
    "is_chunked",
]

CHUNK_LOG2 = 24
CHUNK = 1 << CHUNK_LOG2
"""Chunk size of the checksum: large enough that a chunk's hand-over costs nothing next to its
hashing (about 1 ms), small enough that a 100 MB file already spreads over several cores."""

_PREFIX = f"tree{CHUNK_LOG2}:"
DIGEST_PATTERN = rf"({_PREFIX})?[0-9a-f]{{1,32}}"
"""A recorded digest: chunked (with the prefix) or a plain xxh3 of manifests written before."""


class Hasher(Protocol):
    def update(self, data: Any) -> None: ...

    def hexdigest(self) -> str: ...


def is_chunked(digest: str) -> bool:
    """Whether a recorded digest is of this module's chunked scheme (else a plain xxh3)."""
    return digest.startswith(_PREFIX)


def combine_chunks(chunk_digests: list[int]) -> str:
    """The file checksum from the ``xxh3_64`` int digests of its consecutive :data:`CHUNK`-byte
    chunks, in order (hashed by whoever has them: :mod:`~ckpt_plugins.persist.hashed_copy` hashes
    each chunk right after copying it, on several threads)."""
    joined = b"".join(d.to_bytes(8, "little") for d in chunk_digests)
    return _PREFIX + xxhash.xxh3_64_hexdigest(joined)


class FileHasher:
    """The chunked checksum of a byte stream fed in order, in pieces of any size.

    ``head``: the first bytes of the stream (a tensor file's header), as ``xxh3_64(head)``.
    """

    def __init__(self, head: bytes = b"") -> None:
        self._digests: list[int] = []
        self._current = xxhash.xxh3_64()
        self._filled = 0
        if head:
            self.update(head)

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            room = CHUNK - self._filled
            part = view[:room]
            self._current.update(part)
            self._filled += len(part)
            view = view[len(part) :]
            if self._filled == CHUNK:
                self._digests.append(self._current.intdigest())
                self._current = xxhash.xxh3_64()
                self._filled = 0

    def hexdigest(self) -> str:
        tail = [self._current.intdigest()] if self._filled or not self._digests else []
        return combine_chunks(self._digests + tail)


def hasher_like(digest: str | None) -> Hasher:
    """A hasher that computes a digest comparable with ``digest`` (a recorded one), or a chunked
    one when there is nothing to compare with."""
    if digest is not None and not is_chunked(digest):
        return xxhash.xxh3_64()  # the plain whole-file xxh3 of manifests written before
    return FileHasher()


def digest_buffer(buffer: Any, *, like: str | None = None, threads: int | None = None) -> str:
    """The checksum of ``buffer`` (bytes, a memoryview or a mapping), its chunks hashed on one
    thread per core (or on ``threads``: 1 for a hash in the background, which must leave the
    training thread its core); in the plain scheme when ``like`` is a digest recorded in it.

    The threads are started and joined here (a few tens of microseconds, next to about 1 ms per
    chunk): when this returns, nothing holds a view of ``buffer``, so a mapping can be closed."""
    view = memoryview(buffer).cast("B")
    if like is not None and not is_chunked(like):
        return str(xxhash.xxh3_64_hexdigest(view))
    starts = range(0, max(len(view), 1), CHUNK)
    workers = min(len(starts), threads or cores())
    if workers == 1:
        return combine_chunks([xxhash.xxh3_64_intdigest(view[start : start + CHUNK]) for start in starts])
    digests = [0] * len(starts)
    errors: list[BaseException] = []

    def hash_range(worker: int) -> None:
        # Each thread takes one contiguous run of chunks: a cold file is then read as a few
        # sequential streams that the kernel's readahead follows (chunks dealt out in turn were
        # measured 1.8x slower cold than one thread), a warm one on every core.
        try:
            for i in range(worker * len(starts) // workers, (worker + 1) * len(starts) // workers):
                digests[i] = xxhash.xxh3_64_intdigest(view[starts[i] : starts[i] + CHUNK])
        except BaseException as exc:  # raised below, on the caller's thread
            errors.append(exc)

    helpers = [threading.Thread(target=hash_range, args=(w,), name="ckpt-verify") for w in range(1, workers)]
    for helper in helpers:
        helper.start()
    hash_range(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    return combine_chunks(digests)


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
