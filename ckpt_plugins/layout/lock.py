"""A write lock on a checkpoint directory, so two managers never write one directory at once.

The lock is a ``.lock`` file holding the owner's host, pid and process start time. Local
directories create it with O_EXCL, which is atomic. A lock whose owner is on this host and no
longer running (or whose pid now belongs to a different process, detected through the start
time) is stale: it is taken over with a warning. A lock held by another host cannot be checked
and is reported with instructions.

On object stores (S3) there is no O_EXCL; the lock is a conditional create instead
(``PUT`` with ``If-None-Match: *``: of two writers, exactly one succeeds). The object holds the
holder and a heartbeat time that the holder refreshes every ``HEARTBEAT_S`` seconds with an
ETag-conditional PUT. A lock is stale when its holder is on this host and gone, or when its
heartbeat is older than ``STALE_AFTER_S`` (any host); it is then taken over with a WARNING, again
conditionally (``If-Match`` on the stale object's ETag), so two contenders cannot both win. A store
without conditional writes gets exists-then-write: the lock is then advisory (docs/storage.md).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from ckpt_plugins.errors import LockedError, NotWritableError
from ckpt_plugins.storage import LocalStorage, Storage

__all__ = ["LOCK_NAME", "DirectoryLock"]

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
HEARTBEAT_S = float(os.environ.get("CKPT_PLUGINS_LOCK_HEARTBEAT_S", "30"))
STALE_AFTER_S = float(os.environ.get("CKPT_PLUGINS_LOCK_STALE_S", "300"))


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether process ``pid`` of this host still runs (and, given ``start_time``, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current = _process_start_time(pid)
    return start_time is None or current is None or current == start_time


class DirectoryLock:
    """Exclusive write lock for one checkpoint directory (acquire/release, or a context manager)."""

    def __init__(self, storage: Storage, root: str) -> None:
        self.storage = storage
        self.path = storage.join(root, LOCK_NAME)
        self.held = False
        self._owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _process_start_time(os.getpid()),
            "since": time.time(),
        }
        self._conditional = hasattr(storage, "create_exclusive")  # object stores
        self._etag = ""
        self._holder_etag = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(3):
            try:
                created = self._try_create()
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise NotWritableError(
                        f"{self.path}: cannot create the lock file ({exc.strerror}); the directory "
                        "is not writable. Fix its permissions, or open the CheckpointManager with "
                        "read_only=True to list and restore only."
                    ) from exc
                raise
            if created:
                self.held = True
                return
            holder = self._read_holder()
            if holder is None:
                continue  # removed or half-written in between; try again
            if self._is_stale(holder):
                log.warning(
                    "taking over the lock %s left by process %s on %s, which is no longer running%s",
                    self.path,
                    holder.get("pid"),
                    holder.get("host"),
                    self._heartbeat_age(holder),
                )
                if self._conditional:
                    if self._take_over():
                        return
                    continue
                try:
                    self.storage.remove_file(self.path)
                except FileNotFoundError:
                    pass
                continue
            raise LockedError(
                f"{self.path} is held by process {holder.get('pid')} on host {holder.get('host')}: "
                "another CheckpointManager is writing this directory. Close it first, use another "
                "directory, or, if that process is gone, delete the .lock file."
            )
        raise LockedError(f"could not acquire {self.path}: it kept changing; is another process starting up?")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._conditional:
            self._stop.set()
            if self._beat is not None:
                self._beat.join(timeout=10)
            self.storage.remove_if(self.path, self._etag)  # type: ignore[attr-defined]
            return
        holder = self._read_holder()
        if holder is not None and holder.get("pid") == self._owner["pid"] and holder.get("host") == self._owner["host"]:
            try:
                self.storage.remove_file(self.path)
            except FileNotFoundError:
                pass

    def _try_create(self) -> bool:
        payload = self._payload()
        if self._conditional:
            if not self.storage.create_exclusive(self.path, payload):  # type: ignore[attr-defined]
                return False
            self._started()
            return True
        if isinstance(self.storage, LocalStorage):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return True
        if self.storage.exists(self.path):  # object stores: best effort, no atomic create
            return False
        with self.storage.open_write(self.path) as f:
            f.write(payload)
        return True

    # --- object stores: heartbeat and conditional takeover ----------------------------------
    def _payload(self) -> bytes:
        return json.dumps({**self._owner, "heartbeat": time.time()}).encode()

    def _started(self) -> None:
        tagged = self.storage.read_tagged(self.path)  # type: ignore[attr-defined]
        self._etag = tagged[1] if tagged else ""
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="ckpt-lock-heartbeat", daemon=True)
        self._beat.start()

    def _take_over(self) -> bool:
        if not self.storage.replace_if(self.path, self._payload(), self._holder_etag):  # type: ignore[attr-defined]
            return False  # someone else took it first, or its holder came back
        self.held = True
        self._started()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                payload = self._payload()
                if not self.storage.replace_if(self.path, payload, self._etag):  # type: ignore[attr-defined]
                    log.error(
                        "the lock %s was taken over by another process while this one held it (its "
                        "heartbeat was missed for %.0f s?); two writers may now share the directory",
                        self.path,
                        STALE_AFTER_S,
                    )
                    return
                tagged = self.storage.read_tagged(self.path)  # type: ignore[attr-defined]
                self._etag = tagged[1] if tagged else self._etag
            except Exception as exc:
                log.warning("could not refresh the lock %s (%s); retrying in %.0f s", self.path, exc, HEARTBEAT_S)

    @staticmethod
    def _heartbeat_age(holder: dict[str, Any]) -> str:
        beat = holder.get("heartbeat")
        return f" (last heartbeat {time.time() - beat:.0f} s ago)" if isinstance(beat, (int, float)) else ""

    def _read_holder(self) -> dict[str, Any] | None:
        if self._conditional:
            tagged = self.storage.read_tagged(self.path)  # type: ignore[attr-defined]
            if tagged is None:
                return None
            self._holder_etag = tagged[1]
            try:
                holder = json.loads(tagged[0])
            except ValueError:
                return {"garbled": True}
            return holder if isinstance(holder, dict) else {"garbled": True}
        try:
            with self.storage.open_read(self.path) as f:
                holder = json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"garbled": True}
        return holder if isinstance(holder, dict) else {"garbled": True}

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("garbled"):
            # Empty or unreadable: either an owner killed between creating and writing it, or one
            # writing it right now. Look again after a moment; still garbled means abandoned.
            time.sleep(0.2)
            again = self._read_holder()
            return again is not None and bool(again.get("garbled"))
        beat = holder.get("heartbeat")
        if self._conditional and isinstance(beat, (int, float)) and time.time() - beat > STALE_AFTER_S:
            return True  # any host: its holder stopped refreshing it
        if holder.get("host") != self._owner["host"] or not isinstance(holder.get("pid"), int):
            return False
        return not process_alive(holder["pid"], holder.get("start_time"))

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
