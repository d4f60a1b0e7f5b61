"""Any fsspec URL (``memory://``, ``s3://``, ...).

Object stores have no directory fsync and no atomic directory rename; there the manifest, written
last, is what makes a checkpoint visible (a folder without one is never listed).
"""

from __future__ import annotations

import errno
from typing import BinaryIO, cast

import fsspec

__all__ = ["FsspecStorage"]


class FsspecStorage:
    """Any fsspec file system. Durability is whatever the backend gives on close()."""

    atomic_rename = True

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> BinaryIO:
        return cast(BinaryIO, self.fs.open(path, "wb"))  # fsspec is untyped

    def open_read(self, path: str) -> BinaryIO:
        return cast(BinaryIO, self.fs.open(path, "rb"))

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
