"""Storage: the narrow file-system interface the commit protocol needs.

Two implementations share one contract:

* :class:`LocalStorage` uses the OS directly, because durability needs what fsspec does not
  expose: ``fsync`` of files and of directories, and ``rename`` of a directory as one atomic step.
* :class:`FsspecStorage` serves fsspec URLs whose ``mv`` is good enough (``memory://``, ...).
* :class:`ObjectStorage` serves object stores (``s3://``, ``gs://``, ...): no rename at all, so
  the commit protocol writes straight under the final prefix and the manifest, one atomic PUT
  written last, is what makes a checkpoint visible (:mod:`ckpt_plugins.layout.object_commit`).
  ``storage.atomic_rename`` tells the layout which protocol applies.

Paths handed to a storage are always strings; ``join`` builds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import fsspec

from ckpt_plugins.storage.base import Storage
from ckpt_plugins.storage.local import LocalStorage
from ckpt_plugins.storage.object_store import ObjectStorage, is_object_store
from ckpt_plugins.storage.remote import FsspecStorage

__all__ = ["FsspecStorage", "LocalStorage", "ObjectStorage", "Storage", "open_storage"]

# botocore's "standard" retry mode retries 5xx, throttling and dropped connections with jittered
# exponential backoff; s3fs adds its own loop on top. A user's own ``config_kwargs`` win.
S3_RETRIES = {"max_attempts": 4, "mode": "standard"}


def open_storage(
    directory: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Storage, str]:
    """Return the storage for ``directory`` (a local path or an fsspec URL) and its root path.

    ``storage_options`` go to the fsspec file system as they are (endpoint, credentials, ...);
    they are never logged or stored.
    """
    text = os.fspath(directory)
    if "://" not in text or text.startswith("file://"):
        local = text[len("file://") :] if text.startswith("file://") else text
        return LocalStorage(), os.path.abspath(os.path.expanduser(local))
    options = dict(storage_options or {})
    if text.split("://", 1)[0] in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        options["config_kwargs"] = config
    fs, root = fsspec.core.url_to_fs(text, **options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return LocalStorage(), os.path.abspath(root)
    if is_object_store(fs):
        return ObjectStorage(fs), root.rstrip("/") or "/"
    return FsspecStorage(fs), root.rstrip("/") or "/"
