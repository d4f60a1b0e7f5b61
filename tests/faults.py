"""Fault injection helpers: an fsspec file system that fails the Nth write, real OS faults, and the
seeded generator of random kill moments."""

from __future__ import annotations

import errno
import os
import random
from typing import ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FaultyMemoryFileSystem(MemoryFileSystem):
    """``faulty://``: an in-memory file system whose Nth file write fails with ``fault_errno``.

    ``arm(n, err)`` makes the n-th ``write`` call from now raise ``OSError(err)`` (1 = the next
    one); ``disarm()`` stops it. Writes are counted across all files, so a test can walk the fault
    through every file a save writes (tensors, extra files, manifest).
    """

    protocol = "faulty"
    root_marker = "/"
    store: ClassVar[dict] = {}  # separate from memory://
    pseudo_dirs: ClassVar[list[str]] = [""]
    countdown: int | None = None
    fault_errno = errno.ENOSPC
    writes = 0

    @classmethod
    def arm(cls, n: int, err: int = errno.ENOSPC) -> None:
        cls.countdown, cls.fault_errno = n, err

    @classmethod
    def disarm(cls) -> None:
        cls.countdown = None

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            original = f.write

            def write(data):
                cls = type(self)
                cls.writes += 1
                if cls.countdown is not None:
                    cls.countdown -= 1
                    if cls.countdown <= 0:
                        cls.countdown = None
                        raise OSError(cls.fault_errno, f"{os.strerror(cls.fault_errno)} (injected)", path)
                return original(data)

            f.write = write
        return f


fsspec.register_implementation("faulty", FaultyMemoryFileSystem, clobber=True)


def reset_faulty() -> None:
    FaultyMemoryFileSystem.store.clear()
    FaultyMemoryFileSystem.pseudo_dirs[:] = [""]
    FaultyMemoryFileSystem.disarm()


def kill_rng(what: str) -> tuple[random.Random, int]:
    """The generator of a test's random kill moments, and its seed.

    The seed is ``CKPT_KILL_SEED`` when set (to replay a failure), else a fresh one; it is printed
    (pytest shows it with a failure) and returned, for the test's assertion messages.
    """
    seed = int(os.environ.get("CKPT_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{what}: kill seed {seed} (replay with CKPT_KILL_SEED={seed})")
    return random.Random(seed), seed
