"""The local-first tier (``mirror=``): commit locally, upload in the background, keep the last K.

``CheckpointManager("s3://bucket/run", mirror="/local/ckpt", keep_local=2)``: every save commits
to ``/local/ckpt`` with the local protocol (the training loop waits for a local disk, not for the
store), and a :class:`Mirror` uploads each committed checkpoint to the store on its own ordered
background writer (one :class:`~ckpt_plugins.persist.engine.PersistEngine`, like async saves;
not the save writer's queue, so that the next local commit never waits for an upload).

What keeps it safe (docs/storage.md has the argument in full):

* **An upload is the object-store commit protocol** (:mod:`ckpt_plugins.layout.object_commit`):
  the files go under the final prefix, each checked against the local manifest's size and xxh3
  while it is read, and the manifest last. A local copy that fails its checksum is never
  committed remotely.
* **Nothing committed is lost in a crash.** The local copy is removed only once the remote one
  is committed (``keep_local`` trims uploaded checkpoints only). At start, holding both locks,
  the next manager cleans the remote prefixes without a manifest and uploads every local
  checkpoint the remote lacks.
* **Remote deletes wait for newer uploads.** Every remote delete is a job on the same FIFO queue
  as the uploads, queued after the upload of the save that caused it, and it is skipped while
  the remote side has no newer checkpoint.
* **The listing is the union** (:class:`~ckpt_plugins.layout.mirror.MirrorLayout`), and restore
  reads the local copy first, the remote one when the local copy is missing or damaged.
* **Names, not steps, are matched** across the sides, and a version by its manifest's commit
  time: templated names (Lightning's ``epoch=0-step=5.ckpt``) and named checkpoints
  (``last.ckpt``) are uploaded, replaced and re-uploaded after a crash like ``step_N``.
* **Under torch.distributed** every rank writes its files into the one local checkpoint folder
  (the local multi-rank protocol), so the local directory must be one every rank sees
  (:meth:`Mirror.check_shared`, at the first save); rank 0 commits it locally and uploads every
  rank's files, the manifest last.

A failed upload (the store unreachable after its retries) is logged as an ERROR naming the step;
the checkpoint stays local and is uploaded again after the next save, at ``close()``, or by the
next manager. ``close()`` waits for the uploads; a checkpoint still not uploaded then is a
``SaveError`` (``on_error="raise"``) or an ERROR line (``"warn"``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError, SaveError
from ckpt_plugins.files.checksum import hasher_like
from ckpt_plugins.files.manifest import MANIFEST_NAME, Manifest
from ckpt_plugins.layout.commit import DAMAGED_SUFFIX, Layout
from ckpt_plugins.layout.lock import DirectoryLock
from ckpt_plugins.layout.mirror import MirrorLayout
from ckpt_plugins.layout.naming import NameTemplate, natural_key
from ckpt_plugins.options import ManagerOptions
from ckpt_plugins.options.mirror import MirrorOptions
from ckpt_plugins.persist.engine import PersistEngine, SaveHandle
from ckpt_plugins.storage import LocalStorage, Storage, open_storage

__all__ = ["MARKER_NAME", "Mirror", "copy_checked", "download", "open_mirror"]

log = logging.getLogger(__name__)

MARKER_NAME = ".mirror.json"  # in the local directory: which remote it mirrors (a URL, never credentials)
CHUNK = 32 << 20  # read size of an upload (the object store's part size)


def open_mirror(
    directory: str, options: ManagerOptions, storage_options: Mapping[str, Any] | None, world_size: int
) -> Mirror | None:
    """The manager's mirror for ``options.mirror`` (None without one). Under ``torch.distributed``
    every rank has one (their saves commit into the one local directory, which every rank must
    see: :meth:`Mirror.check_shared`); rank 0 alone uploads."""
    if options.mirror.mirror is None:
        return None
    return Mirror(
        directory,
        options.mirror,
        storage_options,
        prefix=options.io.dir_prefix,
        template=options.io.name_template,
        read_only=options.io.read_only,
        on_error=options.saving.on_error,
    )


class Mirror:
    """The uploader of one manager's local mirror, and the union view of both directories.

    Checkpoints are matched across the two sides by folder name, and a local checkpoint counts as
    uploaded when the remote one of that name has the same step and commit time (its manifest's
    ``wall_time``): a checkpoint replaced locally (``overwrite``, a named ``last.ckpt`` saved again)
    is uploaded again, by the next manager too.

    Args:
        directory: the remote URL (the store); what the manager reports as its directory.
        options: ``mirror`` (the local directory) and ``keep_local``.
        storage_options: for the remote file system only; never stored or logged.
        prefix: checkpoint folder prefix (``step_``).
        template: the manager's ``name_template`` (None: ``<prefix><step>`` folders).
        read_only: list and restore only (no locks, no uploads).
        on_error: ``"raise"``: checkpoints still not uploaded at ``close()`` are a SaveError.
    """

    def __init__(
        self,
        directory: str,
        options: MirrorOptions,
        storage_options: Mapping[str, Any] | None,
        *,
        prefix: str,
        template: str | None = None,
        read_only: bool,
        on_error: str,
    ) -> None:
        remote_storage, remote_root = open_storage(directory, storage_options)
        if remote_storage.local_path(remote_root) is not None:
            raise ConfigError(
                f"$mirror is a local copy of a remote directory, and {directory!r} is local; pass the "
                "object store URL (s3://bucket/run) as directory, or drop mirror",
                option="mirror",
                value=options.mirror,
            )
        local_root = options.local_path
        assert local_root is not None
        self.directory = directory
        self.keep_local = options.keep_local
        self.read_only = read_only
        self.on_error = on_error
        self.local_storage: Storage = LocalStorage()
        self.local_root = local_root
        names = NameTemplate(template) if template is not None else None
        self.remote = Layout(remote_storage, remote_root, prefix, names)
        self.layout = MirrorLayout(self.local_storage, local_root, prefix, names, remote=self.remote, tier=self)
        self.engine = PersistEngine(async_save=True, name="ckpt-upload", stop_when_idle=True)
        self._remote_lock = DirectoryLock(remote_storage, remote_root)
        self._lock = threading.Lock()
        # known while this process is the writer (holds the lock): remote folder name -> (step, or
        # None for a named checkpoint; its commit time, None until read from its manifest)
        self._remote: dict[str, tuple[int | None, float | None]] | None = None
        self._failed: dict[str, str] = {}  # folder name -> why its last upload failed
        self._token = uuid.uuid4().hex  # in the marker while this process writes (check_shared)
        self._started = False

    # --- start and stop ----------------------------------------------------------------------
    def start(self) -> None:
        """Rank 0, after the local lock and clean-up: take the remote lock, clean the remote
        leftovers, check the local directory mirrors this remote, and queue the upload of every
        local checkpoint the remote lacks or holds an older version of (what a crash left
        between commit and upload: step and named checkpoints alike)."""
        self._check_marker()
        self._remote_lock.acquire()
        self._started = True
        self.remote.cleanup_leftovers()
        remote: dict[str, tuple[int | None, float | None]] = {
            _name(c.path): (c.step, None) for c in self.remote.committed()
        }
        with self._lock:
            self._remote = remote
        missing = [name for name, _, manifest in self._local_checkpoints() if not self._uploaded(name, manifest)]
        if missing:
            log.info(
                "%s are committed in %s but not in %s (a run ended before uploading them); uploading them",
                missing,
                self.local_root,
                self.directory,
            )
        self._submit("sync", self._sync)

    def check_shared(self, rank: int) -> None:
        """Under ``torch.distributed``, at the first save, on every rank (two all_gathers of a few
        bytes): every rank must see the local directory rank 0 writes (one host, or a file system
        every rank mounts), because every rank writes its files into the one checkpoint folder
        there and rank 0 commits and uploads it. Every rank raises the same ConfigError if not."""
        from ckpt_plugins.distributed import all_gather_object

        tokens = all_gather_object(self._token if rank == 0 else None)  # rank 0's start() is done
        seen = all_gather_object(self._read_marker().get("writer") == tokens[0])
        blind = [r for r, ok in enumerate(seen) if not ok]
        if blind:
            raise ConfigError(
                f"$mirror={self.local_root!r} is not the directory rank 0 writes for rank(s) {blind} "
                "(another host's disk?); under torch.distributed every rank writes into one checkpoint "
                "folder there, so it must be one directory every rank sees (one host, or a shared file "
                "system); drop mirror on multi-host jobs without one",
                option="mirror",
                value=self.local_root,
            )

    def wait(self) -> None:
        """Block until every queued upload and remote delete has run; raise a SaveError naming the
        checkpoints whose upload failed (they are still local, and are tried again later)."""
        self.engine.flush()
        with self._lock:
            failed = dict(self._failed)
        if failed:
            raise SaveError(
                f"uploading to {self.directory} failed for {', '.join(sorted(failed))} ("
                + "; ".join(failed.values())
                + f"); they are committed in {self.local_root} and are uploaded again after the next save, "
                "at close, or by the next manager"
            )

    def close(self) -> None:
        """Try once more to upload what is missing, wait for the uploads, release the remote lock."""
        if not self._started:
            return
        try:
            if self._failed:
                self._submit("sync", self._sync)
            try:
                self.wait()
            except SaveError as exc:
                if self.on_error != "warn":
                    raise
                log.error("%s", exc)
        finally:
            self.engine.shutdown()
            self._remote_lock.release()
            self._started = False

    def pending(self) -> list[int]:
        """Steps committed locally that the remote does not have yet (in that version)."""
        return [
            manifest.step
            for name, listed, manifest in self._local_checkpoints()
            if listed and not self._uploaded(name, manifest)
        ]

    def pending_names(self) -> list[str]:
        """Folder names (step and named checkpoints) committed locally and not uploaded yet."""
        return [name for name, _, manifest in self._local_checkpoints() if not self._uploaded(name, manifest)]

    # --- the Tier protocol (MirrorLayout) ------------------------------------------------------
    def remote_checkpoints(self) -> dict[str, int]:
        with self._lock:
            if self._remote is not None:
                return {name: step for name, (step, _) in self._remote.items() if step is not None}
        return {_name(c.path): c.step for c in self.remote.committed()}  # not the writer: another process writes

    def remote_steps(self) -> set[int]:
        """The steps committed in the store."""
        return set(self.remote_checkpoints().values())

    def committed_locally(self, step: int, name: str | None) -> None:
        self._submit(name or f"step {step}", self._sync)

    def removed(self, name: str) -> None:
        if self._started:
            self._submit(f"delete {name}", lambda: self._delete_remote(name))

    # --- what is where ---------------------------------------------------------------------------
    def _local_checkpoints(self) -> list[tuple[str, bool, Manifest]]:
        """Every checkpoint committed locally, step and named: (folder name, listed, manifest),
        oldest commit first."""
        found = []
        storage, layout = self.local_storage, self.layout
        for name in storage.listdir(self.local_root):
            path = storage.join(self.local_root, name)
            if name.startswith(".") or DAMAGED_SUFFIX in name or not storage.exists(storage.join(path, MANIFEST_NAME)):
                continue
            try:
                manifest = layout._local.read_manifest(path)
            except CorruptCheckpointError as exc:
                log.warning("%s; not uploaded", exc)
                continue
            found.append((name, layout.is_listed(name), manifest))
        return sorted(found, key=lambda f: (f[2].wall_time, natural_key(f[0])))

    def _uploaded(self, name: str, manifest: Manifest) -> bool:
        """Whether the store holds this version of the local checkpoint ``name``."""
        with self._lock:
            known = None if self._remote is None else self._remote.get(name)
        if self._remote is not None and known is None:
            return False
        if known is not None and known[1] is not None:
            return known[0] in (manifest.step, None) and known[1] == manifest.wall_time
        path = self.remote.storage.join(self.remote.root, name)
        try:
            theirs = self.remote.read_manifest(path)
        except (CorruptCheckpointError, OSError):
            return False
        with self._lock:
            if self._remote is not None:
                self._remote[name] = (known[0] if known is not None else None, theirs.wall_time)
        return theirs.step == manifest.step and theirs.wall_time == manifest.wall_time

    # --- jobs on the upload writer ---------------------------------------------------------------
    def _submit(self, what: str, job: Any) -> None:
        def run(handle: SaveHandle) -> str:
            handle._staged.set_result(None)
            try:
                job()
            except Exception:  # a job never fails the engine: errors are logged and kept in _failed
                log.exception("the mirror's upload writer failed on %s", what)
            handle._reported = True  # nothing to report through the handle: the engine may forget it
            return what

        self.engine.submit(SaveHandle(-1, what), run)

    def _sync(self) -> None:
        """Upload every local checkpoint the remote lacks in this version (oldest first), then trim
        the local copies."""
        local = self._local_checkpoints()
        for name, listed, manifest in local:
            if not self._uploaded(name, manifest):
                self._upload(name, listed)
        with self._lock:  # a failed upload of a checkpoint removed since is no longer missing
            present = {name for name, _, _ in local}
            self._failed = {label: why for label, why in self._failed.items() if label in present}
        self._trim()

    def _upload(self, name: str, listed: bool) -> None:
        local, remote = self.layout, self.remote
        src = local.storage.join(self.local_root, name)
        join = local.storage.join
        try:
            manifest = local._local.read_manifest(src)
        except CorruptCheckpointError as exc:
            if not local.storage.exists(src):  # removed since (retention): nothing to upload
                with self._lock:
                    self._failed.pop(name, None)
                return
            self._fail(name, exc)
            return
        step = manifest.step
        label = f"{name} (step {step})" if listed else name
        final = remote.storage.join(remote.root, name)
        dest = remote.new_temp_dir(step, uuid.uuid4().hex[:12], name)
        try:
            for file, record in manifest.files.items():
                copy_checked(local.storage, join(src, file), remote.storage, remote.storage.join(dest, file), record)
            remote.commit(dest, manifest, replace=remote.storage.exists(final), name=name)
        except BaseException as exc:
            remote.discard(dest)
            if isinstance(exc, Exception) and self._changed(src, manifest):
                # removed (retention) or replaced (a new version of the name: its own upload follows)
                log.info("%s changed in %s while it was being uploaded; not uploaded", name, self.local_root)
                with self._lock:
                    self._failed.pop(name, None)
                return
            if not isinstance(exc, Exception):
                raise
            self._fail(name, exc, label)
            return
        with self._lock:
            if self._remote is not None:
                self._remote[name] = (step if listed else None, manifest.wall_time)
            self._failed.pop(name, None)
        log.info("uploaded %s to %s", name, final)

    def _changed(self, src: str, manifest: Manifest) -> bool:
        """Whether the local checkpoint at ``src`` is gone or another version than ``manifest``."""
        try:
            now = self.layout._local.read_manifest(src)
        except CorruptCheckpointError:
            return True
        return now.wall_time != manifest.wall_time

    def _fail(self, name: str, exc: BaseException, label: str | None = None) -> None:
        label = label or name
        log.error(
            "uploading %s to %s failed: %s; it stays committed in %s and is uploaded again after the next "
            "save, at close, or by the next manager",
            label,
            self.directory,
            exc,
            self.local_root,
        )
        with self._lock:
            self._failed[name] = f"{label}: {exc}"

    def _trim(self) -> None:
        """Keep the newest ``keep_local`` local step checkpoints; remove older ones that are
        uploaded (named checkpoints, addressed by path, stay)."""
        local = [(name, manifest) for name, listed, manifest in self._local_checkpoints() if listed]
        local.sort(key=lambda item: (item[1].step, natural_key(item[0])))
        for name, manifest in local[: max(0, len(local) - self.keep_local)]:
            if self._uploaded(name, manifest):
                log.info("removing the local copy of %s (uploaded; keep_local=%d)", name, self.keep_local)
                self.layout.delete_local(self.local_storage.join(self.local_root, name))

    def _delete_remote(self, name: str) -> None:
        with self._lock:
            known = dict(self._remote or {})
        if name not in known:
            return
        step = known[name][0]
        if step is not None and not any(s is not None and s > step for s, _ in known.values()):
            log.info(
                "keeping %s in %s for now: no newer checkpoint is uploaded yet (retention removes it later)",
                name,
                self.directory,
            )
            return
        self.remote.delete_path(self.remote.storage.join(self.remote.root, name))
        with self._lock:
            if self._remote is not None:
                self._remote.pop(name, None)

    # --- the local directory belongs to one remote ----------------------------------------------
    def _read_marker(self) -> dict[str, Any]:
        path = os.path.join(self.local_root, MARKER_NAME)
        try:
            with open(path, "rb") as f:
                value = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _check_marker(self) -> None:
        """The local directory mirrors one remote: refuse another; record this writer's token."""
        path = os.path.join(self.local_root, MARKER_NAME)
        mine = {"remote": _url(self.remote)}
        if os.path.exists(path):
            theirs = self._read_marker()
            if theirs.get("remote") != mine["remote"]:
                raise ConfigError(
                    f"$mirror={self.local_root!r} mirrors {theirs.get('remote')!r} ({path}), not "
                    f"{mine['remote']!r}; use one local directory per remote directory",
                    option="mirror",
                    value=self.local_root,
                )
        temp = f"{path}.{self._token[:12]}.tmp"
        with open(temp, "wb") as out:
            out.write(json.dumps(mine | {"writer": self._token}).encode())
        os.replace(temp, path)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def download(storage: Storage, path: str, target: str) -> str:
    """Copy the committed checkpoint folder ``path`` of ``storage`` to the local folder ``target``
    (every file checked against the manifest's size and xxh3 while it is read; the folder appears
    by one rename when complete, replacing an older copy). For tools that need local files (the HF
    Trainer resuming from an object store). Returns ``target``."""
    import shutil

    manifest = Layout(storage, path.rstrip("/").rpartition("/")[0] or path).read_manifest(path)
    local = LocalStorage()
    temp = f"{target.rstrip('/')}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        for file, record in manifest.files.items():
            os.makedirs(os.path.dirname(os.path.join(temp, file)), exist_ok=True)
            copy_checked(storage, storage.join(path, file), local, os.path.join(temp, file), record)
        with (
            storage.open_read(storage.join(path, MANIFEST_NAME)) as f,
            open(os.path.join(temp, MANIFEST_NAME), "wb") as out,
        ):
            out.write(f.read())
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def _url(layout: Layout) -> str:
    """The remote directory as a URL (protocol and path: no credentials, no endpoint)."""
    fs = getattr(layout.storage, "fs", None)
    protocol = fs.protocol if fs is not None else "file"
    protocol = protocol[0] if isinstance(protocol, tuple) else protocol
    return f"{protocol}://{layout.root.lstrip('/')}" if protocol != "memory" else f"memory://{layout.root}"


def copy_checked(src_storage: Storage, src: str, dst_storage: Storage, dst: str, expected: Any) -> None:
    """Copy one file, checking its size and xxh3 against the manifest before the upload completes
    (a mismatch aborts it: no damaged object is ever committed)."""
    hasher = hasher_like(expected.xxh3_64)
    size = 0
    with src_storage.open_read(src) as f, dst_storage.open_write(dst) as out:
        write = getattr(out, "write_stable", out.write)  # a fresh buffer per chunk: views may be sent as they are
        while True:
            chunk = bytearray(CHUNK)
            n = f.readinto(chunk)  # type: ignore[attr-defined]
            if not n:
                break
            view = memoryview(chunk)[:n]
            hasher.update(view)
            write(view)
            size += n
        if size != expected.size or hasher.hexdigest() != expected.xxh3_64:
            raise CorruptCheckpointError(
                f"{src}: size {size} / xxh3 {hasher.hexdigest()} do not match the manifest "
                f"({expected.size} / {expected.xxh3_64}); the local copy is damaged and was not uploaded"
            )
