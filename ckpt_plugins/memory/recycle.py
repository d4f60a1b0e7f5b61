"""Snapshot files that reuse the pages of the snapshot they supersede.

A new tmpfs file costs more than the copy into it: the kernel allocates and zeroes every page on
the first write (one more pass over the state's size) and frees the superseded snapshot's pages
when it is removed. The tier therefore keeps the snapshot a new one supersedes as a *spare* (a
hidden ``.tmp-`` folder: never listed, removed by the next start's clean-up like any leftover),
renames it to the next snapshot's temporary folder, and overwrites its files in place:
:class:`ReusingStorage` opens an existing file without truncating it and cuts it to the written
length at close. The commit protocol is unchanged (the old manifest is removed first, the new one
is written last, then the rename), so a snapshot cut short is still a hidden folder.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.storage.local import LocalStorage

__all__ = ["ReusingStorage"]


class _ReusedFile:
    """A binary file written from its start over what it held; cut to the written length at close.
    No fsync: the file lives in a tmpfs (memory), where there is nothing to make durable."""

    def __init__(self, path: str) -> None:
        try:
            self._file: Any = open(path, "r+b", buffering=0)  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115
        self.name = path

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # a raw file may write less than asked
            done += self._file.write(view[done:])
        return done

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._file, attr)

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.truncate(self._file.tell())
            finally:
                self._file.close()

    def __enter__(self) -> _ReusedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReusingStorage(LocalStorage):
    """A :class:`LocalStorage` for a tmpfs whose writes reuse an existing file's pages."""

    def open_write(self, path: str) -> BinaryIO:
        return _ReusedFile(path)  # type: ignore[return-value]

    def fsync_dir(self, path: str) -> None:
        pass  # a tmpfs: renames are as durable as they will ever be

    def recycle(self, spare: str, into: str) -> None:
        """Make the spare folder ``spare`` the temporary folder ``into``, without its manifest
        (the new one is written last, at the commit)."""
        os.rename(spare, into)
        try:
            os.remove(os.path.join(into, MANIFEST_NAME))
        except FileNotFoundError:
            pass
