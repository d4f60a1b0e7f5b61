"""Layout and the commit protocol: what is on disk, and how a checkpoint becomes visible.

A checkpoint for step N lives in ``<root>/step_N/`` (the prefix is configurable: the HF adapter
uses ``checkpoint-N``, the Trainer's own layout), or under a name made by a name template
(:class:`~ckpt_plugins.layout.naming.NameTemplate`, ``epoch=0-step=5.ckpt``): then every visible
name the template can produce is a checkpoint, and its step comes from the name's ``{step}`` field
or, without one, from its manifest. It is written like this, and each step is there for a reason:

1. Everything goes into a hidden temporary folder *beside* the target
   (``.tmp-step_N-<token>``), never into $TMPDIR, because a rename is only atomic within one
   file system.
2. Every file is fsynced as it is closed, so its bytes are on disk before anything refers to them.
3. The manifest is written last and fsynced: a folder with a manifest is complete by
   construction; a folder without one is a leftover and is never listed, restored or counted.
4. The folder is renamed to ``step_N`` and the parent directory is fsynced, so the rename itself
   survives a power cut.
5. Deleting renames to ``.trash-step_N-<token>`` first, then removes, so a half-deleted checkpoint
   can never look valid. Overwriting moves the old folder to ``.replaced-step_N-<token>`` and only
   removes it after the new one is in place; if a crash falls in between, start-up cleanup puts the
   old one back.

Start-up cleanup (rank 0) removes only names with those hidden prefixes; nothing else is touched.

Stores without an atomic rename (``storage.atomic_rename`` is False: S3 and other object stores)
use a different protocol with the same guarantees, in :mod:`ckpt_plugins.layout.object_commit`:
files are written under the final prefix and the manifest, one atomic PUT written last, is the
commit. ``Layout`` picks the protocol; its callers do not know which one runs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError
from ckpt_plugins.files.manifest import MANIFEST_NAME, Manifest, dump_manifest, parse_manifest
from ckpt_plugins.files.tensor_file import checksum_file
from ckpt_plugins.layout.naming import STEP_PREFIX, NameTemplate, natural_key, parse_step_dir, step_dir_name
from ckpt_plugins.layout.object_commit import ObjectCommit
from ckpt_plugins.layout.shared import SHARED_DIR, SharedPool
from ckpt_plugins.storage import Storage

__all__ = ["REPLACED_PREFIX", "TMP_PREFIX", "TRASH_PREFIX", "CheckpointDir", "Layout", "check_folder_name"]

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
REPLACED_PREFIX = ".replaced-"
DAMAGED_SUFFIX = ".damaged-"


@dataclass(frozen=True)
class CheckpointDir:
    """A committed checkpoint folder: its step and full path."""

    step: int
    path: str


def check_folder_name(name: str) -> str:
    """A checkpoint folder name must be one plain, visible path component."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise ConfigError(
            f"checkpoint name {name!r} must be a plain folder name (no '/', not hidden, at most 255 characters)"
        )
    return name


class Layout:
    """Naming, listing, committing and deleting checkpoint folders under one root."""

    def __init__(
        self, storage: Storage, root: str, prefix: str = STEP_PREFIX, template: str | NameTemplate | None = None
    ) -> None:
        self.storage = storage
        self.root = root
        self.prefix = prefix
        self.template = NameTemplate(template) if isinstance(template, str) else template
        self._manifest_steps: dict[str, int] = {}  # template without {step}: name -> step, from manifests
        self._object = None if getattr(storage, "atomic_rename", True) else ObjectCommit(self)
        self.shared = SharedPool(self)  # dedup's .shared/ pool (layout.shared)

    # --- names -------------------------------------------------------------------------------
    def path_for(self, step: int, name: str | None = None) -> str:
        """Where step ``step`` is committed: ``<prefix><step>``, or ``name`` when given. With a
        name template, the committed checkpoint of that step (its name depends on its metrics;
        ``<prefix><step>``, which does not exist, when there is none)."""
        if name is None and self.template is not None:
            found = [c.path for c in self.committed() if c.step == step]
            if found:
                return found[-1]
        return self.storage.join(self.root, name if name is not None else step_dir_name(step, self.prefix))

    def copies(self, step: int) -> list[tuple[Layout, str]]:
        """Where ``step`` can be read from, preferred first: here, one place (a mirror has two:
        :class:`~ckpt_plugins.layout.mirror.MirrorLayout`)."""
        return [(self, self.path_for(step))]

    def is_listed(self, name: str) -> bool:
        """Whether a checkpoint named ``name`` is one of the step checkpoints (listed, ordered,
        retained) rather than a named one addressed by path (``last.ckpt``)."""
        if self.template is None:
            return parse_step_dir(name, self.prefix) is not None
        return DAMAGED_SUFFIX not in name and self.template.match(name)[0]

    def step_of(self, name: str) -> int | None:
        """The step of the entry ``name`` if it is a step checkpoint's name, else None. With a
        template that has no ``{step}`` field, the step is read from its manifest (None when it
        has none: not committed)."""
        if self.template is None:
            return parse_step_dir(name, self.prefix)
        if DAMAGED_SUFFIX in name:
            return None
        matches, step = self.template.match(name)
        if not matches or step is not None:
            return step
        if name not in self._manifest_steps:
            path = self.storage.join(self.root, name)
            if not self.storage.exists(self.storage.join(path, MANIFEST_NAME)):
                return None
            try:
                self._manifest_steps[name] = self.read_manifest(path).step
            except CorruptCheckpointError as exc:
                log.warning("%s; it is not listed", exc)
                return None
        return self._manifest_steps[name]

    def new_temp_dir(self, step: int, token: str | None = None, name: str | None = None) -> str:
        """The hidden folder a save of ``step`` (or of ``name``) writes into before it commits."""
        token = token or uuid.uuid4().hex[:12]
        if self._object is not None:  # no rename: write under the final prefix (a fresh version if committed)
            return self._object.begin(step, token, name)
        final = name if name is not None else step_dir_name(step, self.prefix)
        return self.storage.join(self.root, f"{TMP_PREFIX}{final}-{token}")

    # --- listing -----------------------------------------------------------------------------
    def committed(self) -> list[CheckpointDir]:
        """Committed checkpoints (a ``step_N`` folder holding a manifest), by ascending step."""
        found = []
        for name in self.storage.listdir(self.root):
            step = self.step_of(name)
            if step is None:
                continue
            path = self.storage.join(self.root, name)
            if self.storage.exists(self.storage.join(path, MANIFEST_NAME)):
                found.append((step, natural_key(name), CheckpointDir(step, path)))
        return [c for _, _, c in sorted(found, key=lambda f: f[:2])]

    def read_manifest(self, path: str) -> Manifest:
        """Read and validate ``path``/manifest.json, naming the file in any error."""
        where = self.storage.join(path, MANIFEST_NAME)
        try:
            with self.storage.open_read(where) as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"{where}: manifest is missing; the checkpoint is incomplete") from exc
        return parse_manifest(raw, where)

    # --- commit ------------------------------------------------------------------------------
    def commit(self, temp_dir: str, manifest: Manifest, *, replace: bool = False, name: str | None = None) -> str:
        """Write the manifest into ``temp_dir`` and make it ``step_N`` (or ``name``) atomically;
        return the path."""
        if self._object is not None:
            return self._object.commit(temp_dir, manifest, replace=replace, name=name)
        self.storage.makedirs(temp_dir)
        with self.storage.open_write(self.storage.join(temp_dir, MANIFEST_NAME)) as out:
            out.write(dump_manifest(manifest))
        self.storage.fsync_dir(temp_dir)
        final = self.path_for(manifest.step, name)
        if name is not None:
            self._manifest_steps.pop(name, None)
        replaced = None
        if self.storage.exists(final):
            if not replace:
                raise FileExistsError(f"{final} already exists and overwrite was not requested")
            final_name = name if name is not None else step_dir_name(manifest.step, self.prefix)
            replaced = self.storage.join(self.root, f"{REPLACED_PREFIX}{final_name}-{uuid.uuid4().hex[:12]}")
            self.storage.rename(final, replaced)
        self.storage.rename(temp_dir, final)
        self.storage.fsync_dir(self.root)
        if replaced is not None:
            self._remove(replaced)
        return final

    def delete(self, step: int) -> None:
        """Remove a committed checkpoint: rename it out of sight first, then remove it."""
        self.delete_path(self.path_for(step))

    def delete_path(self, path: str) -> None:
        """Remove the checkpoint folder (or plain file) at ``path`` under the root, the same way;
        then the shared (dedup) files no remaining checkpoint refers to."""
        self._delete_path(path)
        self.shared.collect()

    def _delete_path(self, path: str) -> None:
        if self._object is not None:
            return self._object.delete_path(path)
        if not self.storage.exists(path):
            return
        name = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
        self._manifest_steps.pop(name, None)
        trash = self.storage.join(self.root, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
        self.storage.rename(path, trash)
        self.storage.fsync_dir(self.root)
        self._remove(trash)

    def quarantine(self, step: int, reason: str) -> str:
        """Rename a committed checkpoint to ``<name>.damaged-<token>``: no longer listed (nor
        matched by a framework's ``checkpoint-N`` pattern), never removed by cleanup."""
        path = self.path_for(step)
        if self._object is not None:
            return self._object.quarantine(path, reason)
        target = f"{path}{DAMAGED_SUFFIX}{uuid.uuid4().hex[:12]}"
        self.storage.rename(path, target)
        self.storage.fsync_dir(self.root)
        log.warning("moved damaged checkpoint %s aside to %s: %s", path, target, reason)
        return target

    def verify(self, path: str, progress: Callable[[int], None] | None = None) -> list[str]:
        """Problems with a checkpoint folder: manifest, and every listed file's presence, size and
        xxh3 checksum. An empty list means it is intact. ``progress(nbytes)`` is called after each
        file (for a progress bar)."""
        try:
            manifest = self.read_manifest(path)
        except CorruptCheckpointError as exc:
            return [str(exc)]
        problems = []
        listed = [(self.storage.join(path, n), r) for n, r in manifest.files.items()]
        listed += [(self.shared.path(n), r) for n, r in manifest.shared_files.items()]  # dedup's shared files
        for file_path, expected in listed:
            if not self.storage.exists(file_path):
                problems.append(f"{file_path}: missing")
                continue
            got = checksum_file(self.storage, file_path, like=expected.xxh3_64)
            if got.size != expected.size:
                problems.append(f"{file_path}: size {got.size}, manifest says {expected.size}")
            elif expected.checksummed and got.xxh3_64 != expected.xxh3_64:
                problems.append(f"{file_path}: checksum mismatch (xxh3 {got.xxh3_64}, manifest {expected.xxh3_64})")
            if progress is not None:
                progress(got.size)
        return problems

    def discard(self, temp_dir: str) -> None:
        """Remove a temporary folder after a failed save (best effort; cleanup retries later)."""
        if self._object is not None:
            return self._object.discard(temp_dir)
        try:
            if self.storage.exists(temp_dir):
                self.storage.remove_tree(temp_dir)
        except OSError as exc:
            log.warning(
                "could not remove %s after a failed save (%s); it will be removed at the next start", temp_dir, exc
            )

    def _remove(self, path: str) -> None:
        try:
            self.storage.remove_tree(path)
        except OSError as exc:
            log.warning("could not remove %s (%s); it is hidden and will be removed at the next start", path, exc)

    # --- crash recovery ----------------------------------------------------------------------
    def cleanup_leftovers(self) -> list[str]:
        """Remove what an interrupted run left behind; restore an overwritten checkpoint whose
        replacement never committed. Only hidden names with our prefixes are ever touched; then
        shared (dedup) files no checkpoint refers to (a save cut short wrote them)."""
        removed = self._cleanup_leftovers()
        removed += [f"{SHARED_DIR}/{n}" for n in self.shared.collect()]
        return removed

    def _cleanup_leftovers(self) -> list[str]:
        if self._object is not None:
            return self._object.cleanup_leftovers()
        removed = []
        names = self.storage.listdir(self.root)
        for name in sorted(names):
            path = self.storage.join(self.root, name)
            if name.startswith(REPLACED_PREFIX):
                target_name = name[len(REPLACED_PREFIX) :].rsplit("-", 1)[0]
                final = self.storage.join(self.root, target_name)
                if (
                    target_name
                    and not self.storage.exists(self.storage.join(final, MANIFEST_NAME))
                    and self.storage.exists(self.storage.join(path, MANIFEST_NAME))
                ):
                    if self.storage.exists(final):  # an empty or partial folder without manifest
                        self.storage.remove_tree(final)
                    self.storage.rename(path, final)
                    self.storage.fsync_dir(self.root)
                    log.warning("restored %s: the save that was replacing it did not commit", final)
                    continue
            if name.startswith((TMP_PREFIX, TRASH_PREFIX, REPLACED_PREFIX)):
                self._remove(path)
                removed.append(name)
        if removed:
            log.info("removed %d leftover(s) of an interrupted run in %s: %s", len(removed), self.root, removed)
        return removed
