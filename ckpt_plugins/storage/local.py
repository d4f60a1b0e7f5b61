"""Local files: the OS directly, because durability needs what fsspec does not expose.

``fsync`` of files and of directories, and ``rename`` of a directory as one atomic step.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, BinaryIO

__all__ = ["LocalStorage"]


class _SyncedFile:
    """A binary file that is flushed and fsynced when closed, so close() means durable.

    Everything else (write, tell, seek, flush, ...) is the buffered file's own: writers such as
    ``torch.save`` need the full file interface. Large writes bypass the buffer.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.name = path

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._file, attr)

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> _SyncedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStorage:
    """Local file system with fsync and atomic rename."""

    atomic_rename = True

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> BinaryIO:
        return _SyncedFile(path)  # type: ignore[return-value]

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def rename(self, src: str, dst: str) -> None:
        # os.rename replaces an empty target folder silently on POSIX; refuse instead, so a
        # commit never lands on top of something we did not expect to be there.
        if os.path.exists(dst):
            raise FileExistsError(errno.EEXIST, "rename target exists", dst)
        os.rename(src, dst)

    def remove_tree(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=False)
        else:  # a plain file (or link) in the same place: trash and leftovers can be either
            os.remove(path)

    def remove_file(self, path: str) -> None:
        os.remove(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def local_path(self, path: str) -> str | None:
        return path
