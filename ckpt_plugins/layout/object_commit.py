"""The commit protocol for stores without rename (S3 and other object stores).

An object store has no rename: s3fs's ``mv`` copies every object and then deletes it, in no useful
order, so renaming a finished temporary folder would let a crash leave a listed checkpoint whose
data is missing. What an object store does guarantee is that one object appears whole or not at
all (a PUT, or the completion of a multipart upload). The protocol uses that alone:

1. **Write under the final prefix.** Tensor and extra files are uploaded straight to
   ``<root>/step_N/``. A save under a custom name (``save(name=...)``) first puts a ``.incomplete``
   marker object there, so start-up cleanup knows the prefix is ours; ``step_N`` is known by name.
2. **The manifest last**, in one PUT, listing every file with its size and xxh3 checksum. A prefix
   holding ``manifest.json`` is committed; one without it is never listed, restored or counted,
   and the next writer removes it (rank 0 at start-up, holding the lock, so no live writer can
   be in the middle of it). Then the marker is removed.
3. **Overwrite never leaves neither.** When ``step_N`` is already committed, the new files go under
   a fresh version prefix ``step_N/v<token>/`` (names in the new manifest carry it), so the old
   manifest and its files stay valid until the new manifest *replaces* it in one PUT. Only then
   are the old files removed; a crash before that leaves the old checkpoint listed (the new
   version's files are unreferenced and cleaned up), a crash after it leaves the new one.
4. **Delete removes the manifest first**, then the data: a half-deleted checkpoint has no manifest
   and is never seen as valid.
5. **No checkpoint byte is ever copied inside the store**: no copy, no mv of data objects.

Quarantine (a damaged checkpoint) moves the manifest aside to ``manifest.damaged-<token>.json``
(one small object): the prefix is no longer listed, and cleanup leaves prefixes holding such a
file alone.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING

from ckpt_plugins.files.manifest import MANIFEST_NAME, Manifest, Part, dump_manifest

if TYPE_CHECKING:
    from ckpt_plugins.layout.commit import Layout
    from ckpt_plugins.storage.object_store import ObjectStorage

__all__ = ["DAMAGED_MANIFEST_PREFIX", "INCOMPLETE_MARKER", "ObjectCommit"]

log = logging.getLogger(__name__)

INCOMPLETE_MARKER = ".incomplete"
DAMAGED_MANIFEST_PREFIX = "manifest.damaged-"
_VERSION = re.compile(r"^v[0-9a-f]{12}$")


class ObjectCommit:
    """The object-store halves of :class:`~ckpt_plugins.layout.commit.Layout`'s operations."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.storage: ObjectStorage = layout.storage  # type: ignore[assignment]
        self._empty: set[str] = set()  # prefixes a save began in while they held nothing

    def _rel(self, path: str) -> str:
        return path[len(self.layout.root.rstrip("/")) + 1 :]

    def begin(self, step: int, token: str, name: str | None) -> str:
        """Where a save writes: the final prefix, or a fresh version under it when it is committed.

        One LIST tells both whether the prefix is committed and whether anything is in it; a save
        into an empty prefix then needs no clean-up LIST at its commit."""
        final = self.layout.path_for(step, name)
        join = self.storage.join
        objects = self.storage.find(final)
        if join(final, MANIFEST_NAME) in objects:
            return join(final, f"v{token}")
        if name is not None and not self.layout.is_listed(name):  # cleanup knows listed names; others by the marker
            self.storage.put_bytes(join(final, INCOMPLETE_MARKER), b"")
        elif not objects:
            self._empty.add(final)
        return final

    def commit(self, written: str, manifest: Manifest, *, replace: bool, name: str | None) -> str:
        final = self.layout.path_for(manifest.step, name)
        join = self.storage.join
        manifest_path = join(final, MANIFEST_NAME)
        if written != final:  # a new version of a committed checkpoint
            if not replace:
                raise FileExistsError(f"{final} already exists and overwrite was not requested")
            version = written.rstrip("/").rsplit("/", 1)[-1]
            manifest = _versioned(manifest, version)
        self.storage.put_bytes(manifest_path, dump_manifest(manifest))  # the commit point
        if written in self._empty:
            self._empty.discard(written)  # nothing but this save's files is there
        else:
            self._remove_unreferenced(final, set(manifest.files))
        return final

    def discard(self, written: str) -> None:
        """Remove what a failed save wrote; a committed checkpoint under it is left alone."""
        self._empty.discard(written)
        join = self.storage.join
        tail = written.rstrip("/").rsplit("/", 1)[-1]
        try:
            if _VERSION.match(tail) or not self.storage.exists(join(written, MANIFEST_NAME)):
                self.storage.remove_tree(written)
        except OSError as exc:
            log.warning(
                "could not remove %s after a failed save (%s); it is not listed and will be removed at the next start",
                written,
                exc,
            )

    def delete_path(self, path: str) -> None:
        join = self.storage.join
        if not self.storage.isdir(path):
            if self.storage.exists(path):  # a one-object checkpoint: deleting it is atomic
                self.storage.remove_file(path)
            return
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        if not self.layout.is_listed(tail):
            self.storage.put_bytes(join(path, INCOMPLETE_MARKER), b"")
        if self.storage.exists(join(path, MANIFEST_NAME)):
            self.storage.remove_file(join(path, MANIFEST_NAME))  # no longer listed from here on
        try:
            self.storage.remove_tree(path)
        except OSError as exc:
            log.warning(
                "could not remove the data of %s (%s); it is no longer listed and will be removed at the next start",
                path,
                exc,
            )

    def quarantine(self, path: str, reason: str) -> str:
        target = self.storage.join(path, f"{DAMAGED_MANIFEST_PREFIX}{uuid.uuid4().hex[:12]}.json")
        self.storage.move_small(self.storage.join(path, MANIFEST_NAME), target)
        log.warning(
            "moved the manifest of damaged checkpoint %s aside to %s (the checkpoint is no longer "
            "listed; its files are kept): %s",
            path,
            target,
            reason,
        )
        return target

    def cleanup_leftovers(self) -> list[str]:
        """Remove prefixes without a manifest that are ours, and unreferenced objects in committed
        ones left by an interrupted save, overwrite or delete. Runs under the directory lock."""
        removed = []
        join = self.storage.join
        for name in sorted(self.storage.listdir(self.layout.root)):
            path = join(self.layout.root, name)
            if name.startswith(".") or not self.storage.isdir(path):
                continue
            entries = set(self.storage.listdir(path))
            ours = self.layout.is_listed(name) or INCOMPLETE_MARKER in entries
            if not ours or any(e.startswith(DAMAGED_MANIFEST_PREFIX) for e in entries):
                continue
            if MANIFEST_NAME not in entries:
                self.storage.remove_tree(path)
                removed.append(name)
            elif INCOMPLETE_MARKER in entries or any(_VERSION.match(e) for e in entries):
                manifest = self.layout.read_manifest(path)
                removed += [f"{name}/{r}" for r in self._remove_unreferenced(path, set(manifest.files))]
        if removed:
            log.info("removed %d leftover(s) of an interrupted run in %s: %s", len(removed), self.layout.root, removed)
        return removed

    def _remove_unreferenced(self, prefix: str, keep: set[str]) -> list[str]:
        """Delete every object under ``prefix`` that the manifest does not list (old versions,
        an interrupted save's files, the marker); return their names relative to ``prefix``."""
        base = prefix.rstrip("/") + "/"
        keep = keep | {MANIFEST_NAME}
        stale = [p for p in self.storage.find(prefix) if p.startswith(base) and p[len(base) :] not in keep]
        for path in sorted(stale, key=lambda p: p.endswith(INCOMPLETE_MARKER)):  # the marker goes last
            try:
                self.storage.remove_file(path)
            except FileNotFoundError:
                pass
        return [p[len(base) :] for p in stale]


def _versioned(manifest: Manifest, version: str) -> Manifest:
    """The manifest with every file name under ``version/``."""
    from dataclasses import replace

    files = {f"{version}/{n}": r for n, r in manifest.files.items()}
    parts = {
        k: Part(p.tree, f"{version}/{p.tensor_file}" if p.tensor_file else None, p.shared)
        for k, p in manifest.parts.items()
    }
    return replace(manifest, files=files, parts=parts)
