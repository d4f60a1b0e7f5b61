"""The local-first tier for path-addressed saves: ``CheckpointIOPlugin(mirror=...)``.

Lightning hands ``CheckpointIO`` one path per checkpoint (``s3://bucket/run/epoch=0-step=5.ckpt``).
With ``mirror="/local/ckpt"`` the plugin writes it as ``/local/ckpt/epoch=0-step=5.ckpt`` first (a
local commit: training waits for a local disk), and :class:`PathMirror` uploads the committed
file to its URL in the background, on one ordered upload writer:

* **An upload is one object** (the object store's ``open_write``: the object appears whole or not
  at all), its bytes checked against the size and xxh3 the local write produced while they are
  read, so a local copy damaged on disk is never uploaded.
* **A removal** (``save_top_k``) removes the local copy at once and the remote one after the
  uploads queued before it.
* **A load** reads the local copy when there is one (its checksum verified), else the object.
* **A crash loses nothing committed**: ``.mirror.json`` in the local directory records which
  remote directory it mirrors and the checksum of each file uploaded; at the first save into that
  directory, the next plugin uploads every local file whose checksum the record lacks.
* ``keep_local``: local copies older than the newest N are removed once uploaded.

One local directory mirrors one remote directory (a ``ConfigError`` otherwise). Lightning calls
``CheckpointIO`` on global rank 0 only, so there is one writer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.files.single_file import is_single_file
from ckpt_plugins.files.tensor_file import FileRecord, checksum_file
from ckpt_plugins.options import MirrorOptions
from ckpt_plugins.persist.engine import PersistEngine, SaveHandle
from ckpt_plugins.persist.mirror import MARKER_NAME, copy_checked
from ckpt_plugins.storage import LocalStorage, Storage, open_storage

__all__ = ["PathMirror"]

log = logging.getLogger(__name__)


class PathMirror:
    """Uploads of one plugin's local copies (see the module docstring)."""

    def __init__(self, options: MirrorOptions) -> None:
        assert options.local_path is not None
        self.root = options.local_path
        self.keep_local = options.keep_local
        self.local: Storage = LocalStorage()
        self.engine = PersistEngine(async_save=True, name="ckpt-lightning-upload", stop_when_idle=True)
        self._lock = threading.Lock()
        self._remote_dir: str | None = None
        self._uploaded: dict[str, str] = {}  # file name -> xxh3 of the version the store holds
        self._failed: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"options": MirrorOptions(self.root, self.keep_local)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])  # type: ignore[misc]

    def local_path(self, url: str, storage_options: Mapping[str, Any] | None) -> str | None:
        """Where the save of ``url`` commits locally (None: not mirrored, a local path). The first
        URL fixes the remote directory and queues what a crash left not uploaded."""
        if "://" not in url or url.startswith("file://"):
            return None
        parent, _, name = url.rstrip("/").rpartition("/")
        with self._lock:
            first = self._remote_dir is None
            if first:
                self._remote_dir = parent
                self._check_marker(parent)
        if parent != self._remote_dir:
            raise ConfigError(
                f"$mirror={self.root!r} mirrors {self._remote_dir}, and Lightning saves {url} elsewhere; "
                "use one local directory per remote directory (or one CheckpointIOPlugin each)",
                option="mirror",
                value=self.root,
            )
        if first:
            self._submit("recover", lambda: self._recover(storage_options))
        return os.path.join(self.root, name)

    def local_copy(self, url: str) -> str | None:
        """Where a mirrored ``url`` has its local copy (for a load or a removal; nothing is fixed):
        None when ``url`` is not in the remote directory this mirror serves (or has served)."""
        if "://" not in url or url.startswith("file://"):
            return None
        parent, _, name = url.rstrip("/").rpartition("/")
        with self._lock:
            remote = self._remote_dir or self._marker().get("remote")
        return os.path.join(self.root, name) if parent == remote else None

    def upload_after(
        self, handle: SaveHandle, local: str, url: str, record: list[FileRecord], options: Mapping[str, Any] | None
    ) -> None:
        """Once ``handle`` (the local save of ``local``) committed, upload it to ``url``."""

        def job() -> None:
            handle.wait()
            self._upload(local, url, record[0] if record else checksum_file(self.local, local), options)

        self._submit(url, job)

    def remove(self, url: str, options: Mapping[str, Any] | None) -> None:
        """Remove the store's copy of ``url`` after the uploads queued before."""

        def job() -> None:
            storage, path = open_storage(url, options)
            if storage.exists(path):
                storage.remove_file(path)
            with self._lock:
                self._uploaded.pop(url.rsplit("/", 1)[-1], None)
                self._write_marker()

        self._submit(f"remove {url}", job)

    def wait(self) -> None:
        """Block until every upload and removal has run; log those that failed (still local)."""
        self.engine.flush()
        with self._lock:
            failed, self._failed = dict(self._failed), {}
        for name, why in failed.items():
            log.error(
                "%s was not uploaded (%s); it stays in %s and is uploaded by the next plugin", name, why, self.root
            )

    def close(self) -> None:
        self.wait()
        self.engine.shutdown()

    # --- on the upload writer ----------------------------------------------------------------
    def _submit(self, what: str, job: Any) -> None:
        def run(handle: SaveHandle) -> str:
            handle._staged.set_result(None)
            try:
                job()
            except Exception as exc:  # never fails the engine: the file stays local
                log.exception("the plugin's upload writer failed on %s", what)
                with self._lock:
                    self._failed[what] = str(exc)
            handle._reported = True
            return what

        self.engine.submit(SaveHandle(-1, what), run)

    def _upload(self, local: str, url: str, record: FileRecord, options: Mapping[str, Any] | None) -> None:
        storage, path = open_storage(url, options)
        copy_checked(self.local, local, storage, path, record)
        name = os.path.basename(local)
        with self._lock:
            self._uploaded[name] = record.xxh3_64
            self._write_marker()
        log.info("uploaded %s to %s", local, url)
        self._trim()

    def _recover(self, options: Mapping[str, Any] | None) -> None:
        """Upload the local files a crash left (their checksum is not the recorded upload's)."""
        for name in self._files():
            path = os.path.join(self.root, name)
            record = checksum_file(self.local, path)
            with self._lock:
                done = self._uploaded.get(name) == record.xxh3_64
            if not done:
                log.info("%s was not uploaded to %s (a run ended before); uploading it", path, self._remote_dir)
                self._upload(path, f"{self._remote_dir}/{name}", record, options)

    def _files(self) -> list[str]:
        """Committed local checkpoint files, oldest first."""
        names = [
            n
            for n in os.listdir(self.root)
            if not n.startswith(".") and is_single_file(self.local, os.path.join(self.root, n))
        ]
        return sorted(names, key=lambda n: os.stat(os.path.join(self.root, n)).st_mtime_ns)

    def _trim(self) -> None:
        files = self._files()
        for name in files[: max(0, len(files) - self.keep_local)]:
            path = os.path.join(self.root, name)
            with self._lock:
                uploaded = self._uploaded.get(name)
            if uploaded is not None and checksum_file(self.local, path, like=uploaded).xxh3_64 == uploaded:
                log.info("removing the local copy %s (uploaded; keep_local=%d)", path, self.keep_local)
                os.remove(path)

    # --- the local directory belongs to one remote directory -------------------------------------
    def _marker(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.root, MARKER_NAME), "rb") as f:
                value = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _check_marker(self, parent: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        marker = os.path.join(self.root, MARKER_NAME)
        theirs = self._marker()
        if theirs.get("remote") not in (None, parent):
            raise ConfigError(
                f"$mirror={self.root!r} mirrors {theirs.get('remote')!r} ({marker}), not {parent!r}; use one "
                "local directory per remote directory",
                option="mirror",
                value=self.root,
            )
        self._uploaded = dict(theirs.get("uploaded") or {})
        self._write_marker()

    def _write_marker(self) -> None:
        """Under ``self._lock``: the remote directory (a URL, never credentials) and what it holds."""
        marker = os.path.join(self.root, MARKER_NAME)
        temp = f"{marker}.tmp"
        with open(temp, "wb") as out:
            out.write(json.dumps({"remote": self._remote_dir, "uploaded": self._uploaded}).encode())
        os.replace(temp, marker)
