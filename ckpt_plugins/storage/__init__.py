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

import os

import fsspec

from ckpt_plugins.storage.base import Storage
from ckpt_plugins.storage.local import LocalStorage
from ckpt_plugins.storage.remote import FsspecStorage

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "open_storage"]


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
