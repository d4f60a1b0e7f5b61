"""Storage: the narrow file-system interface the commit protocol needs.

Two implementations share one contract:

* :class:`LocalStorage` uses the OS directly, because durability needs what fsspec does not
  expose: ``fsync`` of files and of directories, and ``rename`` of a directory as one atomic step.
* :class:`FsspecStorage` serves every fsspec URL (``memory://``, ``s3://``, ...). Object stores
  have no directory fsync and no atomic directory rename; there the manifest, written last, is
  what makes a checkpoint visible (a folder without one is never listed), so the contract holds.

Paths handed to a storage are always strings; ``join`` builds them.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import BinaryIO, Protocol

import fsspec

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "open_storage"]


class Storage(Protocol):
    """What the commit protocol, the lock and restore need from a file system."""

    def join(self, *parts: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def makedirs(self, path: str) -> None: ...
    def open_write(self, path: str) -> BinaryIO: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def size(self, path: str) -> int: ...
    def rename(self, src: str, dst: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def remove_file(self, path: str) -> None: ...
    def fsync_dir(self, path: str) -> None: ...
    def local_path(self, path: str) -> str | None: ...


class _SyncedFile:
    """A binary file that is flushed and fsynced when closed, so close() means durable.

    Everything else (write, tell, seek, flush, ...) is the buffered file's own: writers such as
    ``torch.save`` need the full file interface. Large writes bypass the buffer.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.name = path

    def __getattr__(self, attr: str):
        return getattr(self._file, attr)

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> "_SyncedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalStorage:
    """Local file system with fsync and atomic rename."""

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
        return open(path, "rb")  # noqa: SIM115 - the caller closes it

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


class FsspecStorage:
    """Any fsspec file system. Durability is whatever the backend gives on close()."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> BinaryIO:
        return self.fs.open(path, "wb")

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def rename(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            raise FileExistsError(errno.EEXIST, "rename target exists", dst)
        self.fs.mv(src, dst, recursive=True)

    def remove_tree(self, path: str) -> None:
        self.fs.rm(path, recursive=True)

    def remove_file(self, path: str) -> None:
        self.fs.rm(path)

    def fsync_dir(self, path: str) -> None:
        """Object stores have no directory entries to sync; the manifest is the commit point."""

    def local_path(self, path: str) -> str | None:
        return None


def open_storage(directory: str | os.PathLike[str]) -> tuple[Storage, str]:
    """Return the storage for ``directory`` (a local path or an fsspec URL) and its root path."""
    text = os.fspath(directory)
    if "://" not in text or text.startswith("file://"):
        local = text[len("file://"):] if text.startswith("file://") else text
        return LocalStorage(), os.path.abspath(os.path.expanduser(local))
    fs, root = fsspec.core.url_to_fs(text)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return LocalStorage(), os.path.abspath(root)
    return FsspecStorage(fs), root.rstrip("/") or "/"
