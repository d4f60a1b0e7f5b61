"""Object stores (``s3://`` and friends): no rename, atomic whole-object writes, ranged reads.

An object store cannot rename a folder: s3fs's ``mv`` is a copy of every object, then a delete,
in no useful order. What it does give is that **one object appears whole or not at all**: a PUT,
and a multipart upload's completion, are atomic. The commit protocol for these stores
(:mod:`ckpt_plugins.layout.object_commit`) builds on that alone; this module supplies the I/O:

* :meth:`ObjectStorage.open_write` returns an :class:`_UploadWriter`: small files are one PUT at
  ``close()``; large ones a multipart upload whose parts are sent in parallel straight from the
  caller's memory (tensor files hand over views of the staged buffers: no local temporary copy).
  An exception inside the ``with`` aborts the upload, so a failed write never leaves a partial
  object behind.
* :meth:`ObjectStorage.open_read` returns a :class:`_RangedReader` that fetches the next ranges in
  parallel while the caller consumes the current one; a short range is fetched again.
* Retries: every request goes through s3fs's retry loop and botocore's (``standard`` mode, which
  retries 5xx, throttling and dropped connections with backoff). After the last retry the error
  is an ``OSError`` that names the object, the operation and what to do.
* :meth:`ObjectStorage.create_exclusive` is a conditional create (``If-None-Match: *``), the
  primitive the lock needs; :meth:`replace_if` / :meth:`remove_if` are ETag-conditional.

Credentials are never handled here: s3fs finds them (environment, config files, instance roles,
or ``storage_options``), and they are never logged or written into a checkpoint.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, BinaryIO

import fsspec

from ckpt_plugins.storage.remote import FsspecStorage

__all__ = ["OBJECT_PROTOCOLS", "PART_BYTES", "READ_CHUNK", "ObjectStorage"]

log = logging.getLogger(__name__)

OBJECT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
PART_BYTES = 32 << 20  # multipart part size (S3's minimum is 5 MiB, except the last part)
UPLOAD_PARALLEL = 4  # parts in flight per file
READ_CHUNK = 32 << 20  # ranged-read size
READ_PARALLEL = 8  # ranges in flight per file
SHORT_READ_RETRIES = 3


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an object store (no rename; the object-store commit protocol applies)."""
    return any(p in OBJECT_PROTOCOLS for p in _protocols(fs))


class _ViewBody(io.RawIOBase):
    """A read-only, seekable file over a memoryview: botocore sends it (and re-reads it on a
    retry) without the bytes being copied into a ``bytes`` object first."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._view) - self._pos)
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def __len__(self) -> int:
        return len(self._view)


class ObjectStorage(FsspecStorage):
    """An fsspec object store (S3 through s3fs first of all) with the object-store protocol."""

    atomic_rename = False

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        super().__init__(fs)
        self.s3 = hasattr(fs, "_call_s3")
        self.conditional_create = self.s3

    def url(self, path: str) -> str:
        return f"{_protocols(self.fs)[0]}://{path}"

    # --- listing: never from a stale cache (another process may have written since) ---------
    def listdir(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        return super().listdir(path)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return bool(self._call("check", path, self.fs.exists, path))

    def isdir(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return bool(self._call("check", path, self.fs.isdir, path))

    def find(self, path: str) -> list[str]:
        """Every object under ``path`` (full paths)."""
        self.fs.invalidate_cache(path)
        return list(self._call("list", path, self.fs.find, path))

    def makedirs(self, path: str) -> None:
        """Prefixes need no creating (and s3fs would create a missing *bucket*, which we never want)."""

    def size(self, path: str) -> int:
        self.fs.invalidate_cache(path)
        return int(self._call("read", path, self.fs.size, path))

    def rename(self, src: str, dst: str) -> None:
        raise OSError(
            errno.ENOTSUP,
            f"{self.url(src)}: object stores have no rename; the object-store "
            "commit protocol never renames (this is a bug in ckpt_plugins)",
        )

    def move_small(self, src: str, dst: str) -> None:
        """Move one small metadata object (copy + delete; never used for checkpoint data)."""
        self._call("move", src, self.fs.mv, src, dst)

    def remove_tree(self, path: str) -> None:
        self._call("delete", path, self.fs.rm, path, recursive=True)
        self.fs.invalidate_cache(path)

    def remove_file(self, path: str) -> None:
        self._call("delete", path, self.fs.rm_file, path)
        self.fs.invalidate_cache(path)

    # --- whole-object I/O --------------------------------------------------------------------
    def open_write(self, path: str) -> BinaryIO:
        if not self.s3:
            return _DiscardOnError(self.fs.open(path, "wb"))  # type: ignore[return-value]
        return _UploadWriter(self, path)  # type: ignore[return-value]

    def open_read(self, path: str) -> BinaryIO:
        if not self.s3:
            return self._call("read", path, self.fs.open, path, "rb")  # type: ignore[no-any-return]
        return _RangedReader(self, path, self.size(path))  # type: ignore[return-value]

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write one small object in a single PUT (atomic: readers see all of it or nothing)."""
        with self.open_write(path) as out:
            out.write(data)

    # --- conditional writes (the lock) -------------------------------------------------------
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if no object is there (``If-None-Match: *``); False if one is."""
        if not self.conditional_create:
            if self.exists(path):  # advisory only: see docs/storage.md
                return False
            self.put_bytes(path, data)
            return True
        try:
            self._s3("put_object", path, Body=data, IfNoneMatch="*")
        except (FileExistsError, _Conflict):
            return False
        except OSError as exc:
            if "IfNoneMatch" not in str(exc):  # botocore < 1.35.20 does not know the parameter
                raise
            log.warning(
                "%s: this botocore cannot send If-None-Match; the lock is advisory (upgrade botocore to "
                ">= 1.35.20 for an atomic one)",
                self.url(path),
            )
            self.conditional_create = False
            return self.create_exclusive(path, data)
        return True

    def read_tagged(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when there is none."""
        if not self.s3:
            try:
                with self.fs.open(path, "rb") as f:
                    return f.read(), ""
            except FileNotFoundError:
                return None
        try:
            resp = self._s3("get_object", path)
        except FileNotFoundError:
            return None
        body: bytes = self._run(_read_body(resp))
        return body, str(resp["ETag"])

    def replace_if(self, path: str, data: bytes, etag: str) -> bool:
        """Overwrite ``path`` only if its ETag is still ``etag``; False if it changed or vanished."""
        if not self.s3:
            self.put_bytes(path, data)
            return True
        try:
            self._s3("put_object", path, Body=data, IfMatch=etag)
        except (FileExistsError, FileNotFoundError, _Conflict):
            return False
        return True

    def remove_if(self, path: str, etag: str) -> bool:
        """Delete ``path`` only if its ETag is still ``etag``."""
        if not self.s3:
            self.remove_file(path)
            return True
        try:
            self._s3("delete_object", path, IfMatch=etag)
        except (FileExistsError, FileNotFoundError, _Conflict):
            return False
        return True

    # --- plumbing ----------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, lambda: coro)

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    async def _s3_async(self, method: str, path: str, **kwargs: Any) -> Any:
        bucket, key, _ = self.fs.split_path(path)
        try:
            return await self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except OSError as exc:
            if exc.errno == errno.EINVAL and "pre-conditions" in str(exc):
                raise _Conflict(str(exc)) from exc
            if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
                raise self._named(exc, path) from exc
            raise self._failed(method, path, exc) from exc
        except Exception as exc:
            if "ConditionalRequestConflict" in str(exc) or "PreconditionFailed" in str(exc):
                raise _Conflict(str(exc)) from exc
            raise self._failed(method, path, exc) from exc

    def _s3(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._run(self._s3_async(method, path, **kwargs))

    def _call(self, what: str, path: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise self._named(exc, path) from exc
        except Exception as exc:
            raise self._failed(what, path, exc) from exc

    def _named(self, exc: OSError, path: str) -> OSError:
        """The same kind of error (callers tell "missing" from "refused" by its class), with the
        object named and, for a refusal, what to check."""
        if self.url(path) in str(exc):
            return exc
        hint = "; check the credentials and the bucket policy" if isinstance(exc, PermissionError) else ""
        named = type(exc)(exc.errno or errno.EIO, f"{self.url(path)}: {exc.strerror or exc}{hint}")
        named.filename = path
        return named

    def _failed(self, what: str, path: str, exc: BaseException) -> OSError:
        err = OSError(
            errno.EIO,
            f"{self.url(path)}: {what} failed after retries "
            f"({type(exc).__name__}: {exc}); check the endpoint and network, then retry",
        )
        err.filename = path
        return err


class _Conflict(Exception):
    """A conditional request lost (412 Precondition Failed, 409 ConditionalRequestConflict)."""


async def _read_body(resp: Any) -> bytes:
    try:
        body: bytes = await resp["Body"].read()
        return body
    finally:
        resp["Body"].close()


class _DiscardOnError:
    """fsspec's buffered files *commit* on ``__exit__`` even after an exception; discard instead."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._file, attr)

    def __enter__(self) -> _DiscardOnError:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._file.discard()
        else:
            self._file.close()


class _UploadWriter:
    """Sequential writes to one S3 object: one PUT for small files, else a parallel multipart
    upload. ``write_stable`` (for memory that stays valid until ``close``) sends views of the
    caller's buffers without copying; ``write`` copies (the caller may reuse its buffer)."""

    def __init__(self, storage: ObjectStorage, path: str) -> None:
        self.storage, self.path, self.name = storage, path, path
        self._pending: list[memoryview] = []  # the current part, as views
        self._pending_bytes = 0
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[Future[Any]] = []
        self._window: deque[Future[Any]] = deque()
        self.closed = False

    # file-object surface
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        """Parts go out as they fill; the object exists only once ``close`` completes it."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        return self._append(memoryview(bytes(view)) if len(view) else view)

    def write_stable(self, data: Any) -> int:
        return self._append(memoryview(data).cast("B"))

    def _append(self, view: memoryview) -> int:
        if self.closed:
            raise ValueError(f"{self.path}: write to a closed upload")
        n = len(view)
        while len(view):
            take = min(len(view), PART_BYTES - self._pending_bytes)
            self._pending.append(view[:take])
            self._pending_bytes += take
            view = view[take:]
            if self._pending_bytes == PART_BYTES:
                self._send_part()
        self._size += n
        return n

    def _joined(self) -> memoryview:
        if len(self._pending) == 1:
            return self._pending[0]
        return memoryview(b"".join(self._pending))

    def _send_part(self) -> None:
        storage = self.storage
        if self._upload_id is None:
            self._upload_id = storage._s3("create_multipart_upload", self.path)["UploadId"]
        body, number = self._joined(), len(self._parts) + 1
        self._pending, self._pending_bytes = [], 0
        future = storage._submit(
            storage._s3_async(
                "upload_part", self.path, UploadId=self._upload_id, PartNumber=number, Body=_ViewBody(body)
            )
        )
        self._parts.append(future)
        self._window.append(future)
        while len(self._window) >= UPLOAD_PARALLEL:  # bounded parts in flight
            self._window.popleft().result()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        storage = self.storage
        try:
            if self._upload_id is None:
                storage._s3("put_object", self.path, Body=_ViewBody(self._joined()))
            else:
                if self._pending_bytes or not self._parts:
                    self._send_part()
                parts = [{"PartNumber": i + 1, "ETag": f.result()["ETag"]} for i, f in enumerate(self._parts)]
                storage._s3(
                    "complete_multipart_upload", self.path, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            self._abort()
            raise
        finally:
            self._pending = []
            storage.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Give up: nothing appears under the object's name."""
        self.closed = True
        self._pending = []
        self._abort()

    def _abort(self) -> None:
        for future in self._parts:
            future.exception()  # wait for parts in flight
        if self._upload_id is not None:
            try:
                self.storage._s3("abort_multipart_upload", self.path, UploadId=self._upload_id)
            except Exception as exc:
                log.warning(
                    "could not abort the unfinished upload of %s (%s); the store's lifecycle rules expire it",
                    self.storage.url(self.path),
                    exc,
                )
            self._upload_id = None

    def __enter__(self) -> _UploadWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()


class _RangedReader(io.RawIOBase):
    """A seekable read-only file over one object that keeps ``READ_PARALLEL`` ranged GETs in
    flight ahead of the reader. Each range is checked for its length and fetched again if short."""

    def __init__(self, storage: ObjectStorage, path: str, size: int) -> None:
        super().__init__()
        self.storage, self.path, self.name, self._size = storage, path, path, size
        self._pos = 0
        self._ahead: dict[int, Future[bytes]] = {}  # chunk index -> bytes
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _fetch(self, index: int) -> Future[bytes]:
        future = self._ahead.get(index)
        if future is None:
            start = index * READ_CHUNK
            end = min(self._size, start + READ_CHUNK)
            future = self.storage._submit(self._range(start, end))
            self._ahead[index] = future
        return future

    async def _range(self, start: int, end: int) -> bytes:
        storage = self.storage
        for attempt in range(SHORT_READ_RETRIES):
            try:
                data: bytes = await storage.fs._cat_file(self.path, start=start, end=end)
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise storage._failed(f"read of bytes {start}-{end}", self.path, exc) from exc
            if len(data) == end - start:
                return data
            log.info(
                "%s: bytes %d-%d came back short (%d bytes); reading them again (%d)",
                storage.url(self.path),
                start,
                end,
                len(data),
                attempt + 1,
            )
        raise storage._failed(
            f"read of bytes {start}-{end}",
            self.path,
            EOFError(f"the store kept returning {len(data)} bytes instead of {end - start}"),
        )

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            index, within = divmod(self._pos, READ_CHUNK)
            for ahead in range(index + 1, min(index + READ_PARALLEL, -(-self._size // READ_CHUNK))):
                self._fetch(ahead)
            chunk = self._fetch(index).result()
            n = min(len(view) - done, len(chunk) - within)
            view[done : done + n] = chunk[within : within + n]
            done += n
            self._pos += n
            if within + n == len(chunk):
                self._ahead.pop(index, None)
        for stale in [i for i in self._ahead if i < self._pos // READ_CHUNK]:
            self._ahead.pop(stale)  # a seek forward left these behind
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        out = bytearray(min(size, max(0, self._size - self._pos)))
        n = self.readinto(out)
        return bytes(out[:n])

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        super().close()
