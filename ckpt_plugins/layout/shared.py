"""The shared pool of a directory with dedup: ``<root>/.shared/``, and deleting from it.

With ``dedup=True`` a save writes the tensors that changed since the previous checkpoint into one
new pool file (``<step>-<token>.safetensors``) and refers to older pool files for the rest
(:mod:`ckpt_plugins.dedup`). Pool files belong to no checkpoint folder, so deleting a checkpoint
never deletes data another one reads; they are removed by :meth:`SharedPool.collect` once no
manifest on disk refers to them (:func:`ckpt_plugins.retention.shared.unreferenced`).

Crash safety. A pool file is written and fsynced before the manifest that refers to it is
committed; a save cut short leaves an unreferenced pool file, removed at the next start. A delete
removes the checkpoint (its manifest) first and the pool files it alone used after; a crash in
between leaves unreferenced files, removed later. Under one manager, a save in flight reserves
the files it refers to (:meth:`reserve`) until its manifest is committed, and :meth:`collect`
runs under the same lock, so a delete never removes what a save is about to commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.manifest import MANIFEST_NAME, parse_manifest
from ckpt_plugins.retention.shared import unreferenced

if TYPE_CHECKING:
    from ckpt_plugins.layout.commit import Layout

__all__ = ["SHARED_DIR", "SharedPool"]

log = logging.getLogger(__name__)

SHARED_DIR = ".shared"
_SKIP_PREFIXES = (".tmp-", ".trash-", SHARED_DIR)


class SharedPool:
    """The ``.shared/`` folder of one layout: paths, reservations, garbage collection."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.storage = layout.storage
        self.dir = self.storage.join(layout.root, SHARED_DIR)
        self.lock = threading.RLock()
        self._reserved: dict[str, int] = {}

    def path(self, name: str) -> str:
        return self.storage.join(self.dir, name)

    def exists(self) -> bool:
        return self.storage.exists(self.dir)

    def names(self) -> list[str]:
        """The pool's files (none when there is no pool)."""
        if not self.exists():
            return []
        return sorted(n for n in self.storage.listdir(self.dir) if not n.startswith("."))

    def reserve(self, names: Iterable[str]) -> None:
        with self.lock:
            for name in names:
                self._reserved[name] = self._reserved.get(name, 0) + 1

    def release(self, names: Iterable[str]) -> None:
        with self.lock:
            for name in names:
                left = self._reserved.get(name, 0) - 1
                if left > 0:
                    self._reserved[name] = left
                else:
                    self._reserved.pop(name, None)

    def references(self) -> list[set[str]] | None:
        """Per folder with a manifest under the root (committed, named, replaced, quarantined):
        the pool files it reads. None when a manifest could not be read."""
        storage, root = self.storage, self.layout.root
        out: list[set[str]] = []
        for name in storage.listdir(root):
            if name.startswith(_SKIP_PREFIXES):
                continue
            path = storage.join(root, name)
            if not storage.isdir(path):
                continue
            for manifest_name in _manifest_names(storage.listdir(path)):
                where = storage.join(path, manifest_name)
                try:
                    with storage.open_read(where) as f:
                        manifest = parse_manifest(f.read(), where)
                except (CorruptCheckpointError, OSError) as exc:
                    log.warning("dedup: %s; no shared file is deleted until it is readable or removed", exc)
                    return None
                out.append(set(manifest.shared_files))
        return out

    def collect(self) -> list[str]:
        """Delete the pool files no manifest refers to and no save in flight reserved; return them."""
        if not self.exists():
            return []
        with self.lock:
            doomed = unreferenced(self.names(), self.references(), self._reserved)
            for name in sorted(doomed):
                try:
                    self.storage.remove_file(self.path(name))
                except FileNotFoundError:
                    pass
        if doomed:
            log.info("dedup: removed %d shared file(s) no kept checkpoint refers to", len(doomed))
        return sorted(doomed)


def _manifest_names(entries: Iterable[str]) -> list[str]:
    """``manifest.json`` and, on object stores, a quarantined ``manifest.damaged-*.json``."""
    return [e for e in entries if e == MANIFEST_NAME or (e.startswith("manifest.damaged-") and e.endswith(".json"))]
