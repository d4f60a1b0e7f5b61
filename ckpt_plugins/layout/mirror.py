"""Two directories seen as one: the local mirror where saves commit, and the remote they go to.

With ``mirror=`` (:mod:`ckpt_plugins.persist.mirror`) a manager writes into a local directory with
the local commit protocol (hidden folder, manifest, rename) and uploads each committed checkpoint
to the object store in the background. :class:`MirrorLayout` is the ``Layout`` that manager uses:
writing, committing and clean-up are the local layout's; what is *committed* is the union of both
sides, so ``steps()``, retention and ``restore("latest")`` see a checkpoint whether it is still
only local, on both, or (after ``keep_local`` trimmed it) remote only.

* Checkpoints are matched across the sides by folder name (``step_N``, or a name template's
  ``epoch=0-step=5.ckpt``), so templated and named checkpoints mirror like ``step_N`` ones.
* :meth:`copies` gives the places a step can be read from, the local copy first; restore reads
  the first and falls back to the next when it is damaged.
* :meth:`commit` commits locally, then tells the tier, which queues the upload.
* :meth:`delete_path` (retention, overwrite) removes the local copy now and queues the remote
  delete behind the uploads already queued, so a remote checkpoint is only removed after the
  save that superseded it has been uploaded.

The tier (the uploader) is reached through the small :class:`Tier` protocol: layout code does
not depend on the persist package.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from ckpt_plugins.files.manifest import Manifest
from ckpt_plugins.layout.commit import CheckpointDir, Layout
from ckpt_plugins.layout.naming import NameTemplate, natural_key
from ckpt_plugins.storage import Storage

__all__ = ["MirrorLayout", "Tier"]


class Tier(Protocol):
    """What :class:`MirrorLayout` needs from the uploader."""

    def remote_checkpoints(self) -> dict[str, int]:
        """The step checkpoints committed on the remote side: folder name -> step."""
        ...

    def committed_locally(self, step: int, name: str | None) -> None:
        """A checkpoint was committed locally: upload it (in the background)."""
        ...

    def removed(self, name: str) -> None:
        """The checkpoint folder ``name`` is removed (retention, overwrite): remove the remote copy
        too, after the uploads queued before."""
        ...


class MirrorLayout(Layout):
    """The local layout (writes, commits, clean-up), with the remote one's checkpoints in its listing."""

    def __init__(
        self,
        storage: Storage,
        root: str,
        prefix: str,
        template: NameTemplate | None = None,
        *,
        remote: Layout,
        tier: Tier,
    ) -> None:
        super().__init__(storage, root, prefix, template)
        self.remote = remote
        self.tier = tier
        self._local = Layout(storage, root, prefix, template)
        self._delete_lock = threading.Lock()  # retention (save writer) and trimming (uploader) both delete

    def _is_remote(self, path: str) -> bool:
        base = self.root.rstrip("/")
        return not (path == base or path.startswith(base + "/")) and path.startswith(self.remote.root.rstrip("/"))

    def local_committed(self) -> list[CheckpointDir]:
        """The checkpoints committed in the local directory, by ascending step."""
        return self._local.committed()

    # --- the union ---------------------------------------------------------------------------
    def committed(self) -> list[CheckpointDir]:
        """Committed checkpoints on either side, by ascending step; the path is the local copy's
        where there is one."""
        local = self._local.committed()
        have = {c.step for c in local}
        remote = {}  # one remote entry per step (the last name in natural order)
        for name, step in sorted(self.tier.remote_checkpoints().items(), key=lambda item: natural_key(item[0])):
            if step not in have:
                remote[step] = CheckpointDir(step, self._remote_path(name))
        return sorted(local + list(remote.values()), key=lambda c: (c.step, natural_key(c.path)))

    def _remote_path(self, name: str) -> str:
        return self.remote.storage.join(self.remote.root, name)

    def copies(self, step: int) -> list[tuple[Layout, str]]:
        """Where ``step`` can be read: the local copy (when committed), then the remote one."""
        found: list[tuple[Layout, str]] = [(self._local, c.path) for c in self._local.committed() if c.step == step]
        found = found[-1:]
        names = sorted((n for n, s in self.tier.remote_checkpoints().items() if s == step), key=natural_key)
        if names:
            found.append((self.remote, self._remote_path(names[-1])))
        return found or [(self._local, self._local.path_for(step))]

    def read_manifest(self, path: str) -> Manifest:
        return self.remote.read_manifest(path) if self._is_remote(path) else super().read_manifest(path)

    def verify(self, path: str, progress: Callable[[int], None] | None = None) -> list[str]:
        return self.remote.verify(path, progress) if self._is_remote(path) else super().verify(path, progress)

    # --- writing -----------------------------------------------------------------------------
    def commit(self, temp_dir: str, manifest: Manifest, *, replace: bool = False, name: str | None = None) -> str:
        """Commit locally (atomic rename), then queue the upload."""
        path = super().commit(temp_dir, manifest, replace=replace, name=name)
        self.tier.committed_locally(manifest.step, name)
        return path

    def delete_path(self, path: str) -> None:
        """Remove a checkpoint on both sides: the local copy now, the remote one queued after the
        uploads before it."""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not self._is_remote(path):
            self.delete_local(path)
        self.tier.removed(name)

    def delete_local(self, path: str) -> None:
        """Remove the local copy only (``keep_local`` trimming of an uploaded checkpoint)."""
        with self._delete_lock:
            super().delete_path(path)

    def quarantine(self, step: int, reason: str) -> str:
        """Move the damaged copy aside: the local one where there is one, else the remote one."""
        where, _ = self.copies(step)[0]
        if where is self.remote:
            return self.remote.quarantine(step, reason)
        return super().quarantine(step, reason)
