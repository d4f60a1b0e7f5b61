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

import xxhash

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError, SaveError
from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.layout.lock import DirectoryLock
from ckpt_plugins.layout.mirror import MirrorLayout
from ckpt_plugins.layout.naming import parse_step_dir
from ckpt_plugins.options import ManagerOptions
from ckpt_plugins.options.mirror import MirrorOptions
from ckpt_plugins.persist.engine import PersistEngine, SaveHandle
from ckpt_plugins.storage import LocalStorage, Storage, open_storage

__all__ = ["MARKER_NAME", "Mirror", "download", "open_mirror"]

log = logging.getLogger(__name__)

MARKER_NAME = ".mirror.json"  # in the local directory: which remote it mirrors (a URL, never credentials)
CHUNK = 32 << 20  # read size of an upload (the object store's part size)


def open_mirror(
    directory: str, options: ManagerOptions, storage_options: Mapping[str, Any] | None, world_size: int
) -> Mirror | None:
    """The manager's mirror for ``options.mirror`` (None without one)."""
    if options.mirror.mirror is None:
        return None
    if world_size > 1:
        raise ConfigError(
            f"$mirror works with one process for now (this job has {world_size} ranks): a local "
            "directory is per host, and every rank writes into one checkpoint; drop mirror, or save "
            "from one rank with distributed=False",
            option="mirror",
            value=options.mirror.mirror,
        )
    return Mirror(
        directory,
        options.mirror,
        storage_options,
        prefix=options.io.dir_prefix,
        read_only=options.io.read_only,
        on_error=options.saving.on_error,
    )


class Mirror:
    """The uploader of one manager's local mirror, and the union view of both directories.

    Args:
        directory: the remote URL (the store); what the manager reports as its directory.
        options: ``mirror`` (the local directory) and ``keep_local``.
        storage_options: for the remote file system only; never stored or logged.
        prefix: checkpoint folder prefix (``step_``).
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
        self.remote = Layout(remote_storage, remote_root, prefix)
        self.layout = MirrorLayout(self.local_storage, local_root, prefix, remote=self.remote, tier=self)
        self.engine = PersistEngine(async_save=True, name="ckpt-upload", stop_when_idle=True)
        self._remote_lock = DirectoryLock(remote_storage, remote_root)
        self._lock = threading.Lock()
        self._remote: set[int] | None = None  # known while this process is the writer (holds the lock)
        self._names: set[str] = set()  # named checkpoints committed locally in this process, to upload
        self._failed: dict[str, str] = {}  # folder name -> why its last upload failed
        self._started = False

    # --- start and stop ----------------------------------------------------------------------
    def start(self) -> None:
        """Rank 0, after the local lock and clean-up: take the remote lock, clean the remote
        leftovers, check the local directory mirrors this remote, and queue the upload of every
        local checkpoint the remote lacks (what a crash left between commit and upload)."""
        self._check_marker()
        self._remote_lock.acquire()
        self._started = True
        self.remote.cleanup_leftovers()
        with self._lock:
            self._remote = {c.step for c in self.remote.committed()}
        missing = [c.step for c in self.layout.local_committed() if c.step not in self._remote]
        if missing:
            log.info(
                "steps %s are committed in %s but not in %s (a run ended before uploading them); uploading them",
                missing,
                self.local_root,
                self.directory,
            )
        self._submit("sync", self._sync)

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
        """Steps committed locally that the remote does not have yet."""
        remote = self.remote_steps()
        return [c.step for c in self.layout.local_committed() if c.step not in remote]

    # --- the Tier protocol (MirrorLayout) ------------------------------------------------------
    def remote_steps(self) -> set[int]:
        with self._lock:
            if self._remote is not None:
                return set(self._remote)
        return {c.step for c in self.remote.committed()}  # read-only: another process writes

    def committed_locally(self, step: int, name: str | None) -> None:
        if name is not None:
            with self._lock:
                self._names.add(name)
        self._submit(name or f"step {step}", self._sync)

    def removed(self, name: str) -> None:
        if self._started:
            self._submit(f"delete {name}", lambda: self._delete_remote(name))

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
        """Upload every local checkpoint the remote lacks (oldest first), then trim the local copies."""
        with self._lock:
            remote = set(self._remote or ())
            names = sorted(self._names)
        local = self.layout.local_committed()
        for ckpt in local:
            if ckpt.step not in remote:
                self._upload(ckpt.step, None)
        for name in names:
            self._upload(None, name)
        with self._lock:  # a failed upload of a step retention removed since is no longer missing
            present = {f"step {c.step}" for c in local} | self._names
            self._failed = {label: why for label, why in self._failed.items() if label in present}
        self._trim()

    def _upload(self, step: int | None, name: str | None) -> None:
        local, remote = self.layout, self.remote
        src = local.path_for(step or 0, name)
        label = name or f"step {step}"
        join = local.storage.join
        try:
            manifest = local.read_manifest(src)
        except CorruptCheckpointError as exc:
            if not local.storage.exists(src):  # removed since (retention): nothing to upload
                with self._lock:
                    self._names.discard(name or "")
                    self._failed.pop(label, None)
                return
            self._fail(label, exc)
            return
        step = manifest.step
        final = remote.path_for(step, name)
        dest = remote.new_temp_dir(step, uuid.uuid4().hex[:12], name)
        try:
            for file, record in manifest.files.items():
                _copy_checked(local.storage, join(src, file), remote.storage, remote.storage.join(dest, file), record)
            remote.commit(dest, manifest, replace=remote.storage.exists(final), name=name)
        except BaseException as exc:
            remote.discard(dest)
            if isinstance(exc, Exception) and not local.storage.exists(join(src, MANIFEST_NAME)):
                log.info("%s was removed from %s while it was being uploaded; not uploaded", label, self.local_root)
                with self._lock:
                    self._names.discard(name or "")
                    self._failed.pop(label, None)
                return
            if not isinstance(exc, Exception):
                raise
            self._fail(label, exc)
            return
        with self._lock:
            if name is None and self._remote is not None:
                self._remote.add(step)
            self._names.discard(name or "")
            self._failed.pop(label, None)
        log.info("uploaded %s to %s", label, final)

    def _fail(self, label: str, exc: BaseException) -> None:
        log.error(
            "uploading %s to %s failed: %s; it stays committed in %s and is uploaded again after the next "
            "save, at close, or by the next manager",
            label,
            self.directory,
            exc,
            self.local_root,
        )
        with self._lock:
            self._failed[label] = f"{label}: {exc}"

    def _trim(self) -> None:
        """Keep the newest ``keep_local`` local checkpoints; remove older ones that are uploaded."""
        remote = self.remote_steps()
        local = self.layout.local_committed()
        for ckpt in local[: max(0, len(local) - self.keep_local)]:
            if ckpt.step in remote:
                log.info("removing the local copy of step %d (uploaded; keep_local=%d)", ckpt.step, self.keep_local)
                self.layout.delete_local(ckpt.path)

    def _delete_remote(self, name: str) -> None:
        step = parse_step_dir(name, self.remote.prefix)
        with self._lock:
            remote = set(self._remote or ())
        if step is not None:
            if step not in remote:
                return
            if not any(s > step for s in remote):
                log.info(
                    "keeping step %d in %s for now: no newer checkpoint is uploaded yet (retention removes it later)",
                    step,
                    self.directory,
                )
                return
        self.remote.delete_path(self.remote.storage.join(self.remote.root, name))
        with self._lock:
            if step is not None and self._remote is not None:
                self._remote.discard(step)

    # --- the local directory belongs to one remote ----------------------------------------------
    def _check_marker(self) -> None:
        storage, path = self.local_storage, os.path.join(self.local_root, MARKER_NAME)
        mine = {"remote": _url(self.remote)}
        if storage.exists(path):
            with storage.open_read(path) as f:
                try:
                    theirs = json.loads(f.read())
                except ValueError:
                    theirs = {}
            if theirs.get("remote") != mine["remote"]:
                raise ConfigError(
                    f"$mirror={self.local_root!r} mirrors {theirs.get('remote')!r} ({path}), not "
                    f"{mine['remote']!r}; use one local directory per remote directory",
                    option="mirror",
                    value=self.local_root,
                )
            return
        with storage.open_write(path) as out:
            out.write(json.dumps(mine).encode())


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
            _copy_checked(storage, storage.join(path, file), local, os.path.join(temp, file), record)
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


def _copy_checked(src_storage: Storage, src: str, dst_storage: Storage, dst: str, expected: Any) -> None:
    """Copy one file, checking its size and xxh3 against the manifest before the upload completes
    (a mismatch aborts it: no damaged object is ever committed)."""
    hasher = xxhash.xxh3_64()
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
