"""Snapshot tensor files written through shared mappings that last from one snapshot to the next.

Writing a tmpfs file with ``write`` goes through the kernel page by page on one thread (about
13 ms for 64 MiB here, against 6 ms for one ``copy_``), and mapping a file for each save costs
as much again in page faults. So the tier keeps every snapshot file it writes mapped
(``MAP_SHARED``, populated once): the file's pages *are* the mapping's, and a recycled file
(:mod:`.recycle`) is the same inode under a new name, so the next snapshot into it is one
``memmove`` per tensor into memory whose page tables already exist. Nothing is left to
flush: the pages belong to the tmpfs, not to the process, and outlive it.

The checksum is not taken on the caller's thread. :class:`MappedFiles` returns each file's record
with :data:`~ckpt_plugins.files.tensor_file.PENDING_CHECKSUM`; after the commit the tier hashes
the mapped bytes on a helper thread (:class:`DeferredChecksums`), and replaces the committed
manifest with the one that holds the checksums (write, then rename: a reader sees one or the
other). Until then the snapshot is complete, since the commit follows the copy, but not yet
checksummed; a process that dies in that window (a few milliseconds) leaves a snapshot whose
reader can check the sizes only, and says so.

CUDA tensors are copied straight from the device into the mapping: the mapping is registered
with CUDA once (``cudaHostRegister``, page-locked like a pinned buffer), so the copy is one DMA
transfer on a side stream, with no pinned staging buffer and no second copy from it into the
file. A GPU step leaves the host's cores free, so such a snapshot's checksum is taken on all but
one of them.

A mapping keeps its pages alive after its file is removed, so the tier drops the mappings of
files that are gone after every snapshot (:meth:`MappedFiles.keep_only`) and all of them when it
frees the memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ckpt_plugins.files.manifest import MANIFEST_NAME, Manifest, dump_manifest
from ckpt_plugins.files.tensor_file import PENDING_CHECKSUM, FileRecord, file_layout, hash_mapping
from ckpt_plugins.persist.hashed_copy import copy_pieces
from ckpt_plugins.persist.stager import wait_for_caller

__all__ = ["DeferredChecksums", "MappedFiles"]

log = logging.getLogger(__name__)

_Key = tuple[int, int]  # (st_dev, st_ino): a file, whatever its name is now


class _Mapping:
    """One file's shared mapping, and a byte tensor over it (what the copies go into)."""

    def __init__(self, fd: int, size: int) -> None:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # page tables filled once, here
        self.size = size
        self.map = mmap.mmap(fd, size, flags=flags)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self._layout: tuple[Any, ...] | None = None
        self._targets: list[torch.Tensor] = []
        self._registered = False  # with CUDA (page-locked), so device copies into it are DMA
        self._register_tried = False

    def register_with_cuda(self) -> None:
        """Page-lock the mapping for device-to-host copies (tried once per mapping; undone by
        :meth:`close`). Where CUDA refuses, the copies still land, through CUDA's own pageable
        path, and one warning says so."""
        if self._register_tried:
            return
        self._register_tried = True
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        try:
            torch.cuda.check_error(cudart.cudaHostRegister(self.bytes.data_ptr(), self.size, 0))
        except Exception as exc:  # a slower copy, not a failed snapshot
            log.warning("could not page-lock a %d MiB snapshot file for CUDA copies (%s)", self.size >> 20, exc)
            return
        self._registered = True

    def targets(self, layout: tuple[Any, ...], start: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Typed views of the mapping, one per tensor of ``tensors`` (laid out from ``start``
        in this order), built once per layout: a snapshot into a recycled file then costs one
        byte copy per tensor (:func:`~ckpt_plugins.persist.hashed_copy.copy_pieces`), not a
        slice, two views and a copy per tensor in Python."""
        if layout != self._layout:
            self._targets, offset = [], start
            for tensor in tensors:
                nbytes = tensor.numel() * tensor.element_size()
                self._targets.append(self.bytes[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
                offset += nbytes
            self._layout = layout
        return self._targets

    def digest(self, threads: int = 1) -> str:
        """The file's checksum, on a background thread (``threads``: 1 unless the training step
        leaves the cores free, see the module)."""
        return hash_mapping(self.map, self.size, threads=threads)

    def close(self) -> None:
        if self._registered:
            with contextlib.suppress(Exception):
                torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr()))  # type: ignore[no-untyped-call]
            self._registered = False
        self._targets = []  # views, like the byte tensor, hold the buffer export that keeps the map open
        del self.bytes
        self.map.close()


class MappedFiles:
    """The tier's snapshot files, each mapped once and written through its mapping."""

    def __init__(self) -> None:
        self._maps: dict[_Key, _Mapping] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # a side stream per GPU

    def write(
        self,
        path: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        threads: int | None = None,
        after: Any | None = None,
    ) -> tuple[FileRecord, _Mapping]:
        """Write ``tensors`` (contiguous; on the CPU or a GPU) as the safetensors file ``path``
        (new, or a recycled file whose pages are reused): CPU tensors copied on ``threads``
        threads (:func:`~ckpt_plugins.persist.hashed_copy.copy_pieces`), CUDA tensors by DMA
        into the page-locked mapping on a side stream that first waits for ``after`` (a
        :func:`~ckpt_plugins.persist.stager.caller_stream_mark`; default: the work queued on
        this thread's current stream). Returns once every byte is in the file; the record's
        checksum is pending (see the module)."""
        order, head, data_len = file_layout(tensors, metadata)
        size = len(head) + data_len
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino)
            mapping = self._maps.get(key)
            if mapping is None or mapping.size != size:
                if mapping is not None:
                    mapping.close()
                if info.st_size != size:
                    os.ftruncate(fd, size)
                mapping = self._maps[key] = _Mapping(fd, size)
        finally:
            os.close(fd)
        out = mapping.bytes
        out[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        present = [tensors[name] for name in order if tensors[name].numel()]
        layout = (len(head), tuple((name, tensors[name].dtype, tuple(tensors[name].shape)) for name in order))
        pairs = list(zip(mapping.targets(layout, len(head), present), present, strict=True))
        on_gpu = [(dst, src) for dst, src in pairs if src.is_cuda]
        with torch.no_grad():
            events = self._copy_from_devices(mapping, on_gpu, after) if on_gpu else []
            copy_pieces([(dst, src) for dst, src in pairs if not src.is_cuda], threads)
            for event in events:
                event.synchronize()
        return FileRecord(size=size, xxh3_64=PENDING_CHECKSUM), mapping

    def _copy_from_devices(
        self, mapping: _Mapping, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any | None
    ) -> list[Any]:
        """Queue the device-to-host copies of ``pairs`` on each GPU's side stream; the events
        to wait for."""
        mapping.register_with_cuda()
        events = []
        for device in {src.device for _, src in pairs}:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            wait_for_caller(stream, after)
            with torch.cuda.device(device), torch.cuda.stream(stream):
                for dst, src in pairs:
                    if src.device == device:
                        dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            events.append(event)
        return events

    def keep_only(self, folders: Iterable[str]) -> None:
        """Drop the mappings of every file not in ``folders`` (removed, or no longer the tier's)."""
        live: set[_Key] = set()
        for folder in folders:
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    info = os.stat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                live.add((info.st_dev, info.st_ino))
        for key in [k for k in self._maps if k not in live]:
            self._maps.pop(key).close()

    def close(self) -> None:
        """Drop every mapping (the files stay; their pages go with the files)."""
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()


class DeferredChecksums:
    """Hash a committed snapshot's mapped files on a helper thread and record the checksums.

    One snapshot at a time: :meth:`settle` (the tier calls it before the next snapshot, before
    any read, and at the end) waits for the one in progress. ``then(path)`` runs on the helper
    thread once the manifest holds the checksums (the tier offers the snapshot to its peer then).
    The thread is started once and waits between snapshots (starting one per save cost 0.3 ms).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(
        self,
        path: str,
        manifest: Manifest,
        files: Mapping[str, _Mapping],
        then: Callable[[str], None] | None = None,
        threads: int = 1,
    ) -> None:
        """Hash ``files`` (name -> mapping) of the snapshot committed at ``path`` with
        ``manifest`` on ``threads`` threads, and record the checksums in it."""
        self.settle()

        def job() -> None:
            record(path, manifest, {name: m.digest(threads) for name, m in files.items()})
            if then is not None:
                then(path)

        if not self._running():
            job()  # interpreter shutdown (no new threads): here and now
            return
        self._idle.clear()
        self._jobs.put(job)

    def _running(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            try:
                self._thread = threading.Thread(target=self._serve, name="ckpt-snapshot-hash", daemon=True)
                self._thread.start()
            except RuntimeError:
                self._thread = None
        return self._thread is not None

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException as exc:  # raised by the next settle()
                self._error = exc
            finally:
                self._idle.set()

    def settle(self) -> None:
        """Wait for the checksums in progress; raise what went wrong there."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error


def record(path: str, manifest: Manifest, digests: Mapping[str, str]) -> None:
    """Replace the manifest ``path`` was committed with by one holding ``digests`` (file name ->
    xxh3): written beside it, then renamed over it."""
    where = os.path.join(path, MANIFEST_NAME)
    files = {
        name: dataclasses.replace(rec, xxh3_64=digests[name]) if name in digests else rec
        for name, rec in manifest.files.items()
    }
    partial = where + ".partial"
    with open(partial, "wb") as f:
        f.write(dump_manifest(dataclasses.replace(manifest, files=files)))
    os.replace(partial, where)
    log.debug("memory snapshot %s: checksums recorded", path)


def pending(manifest_files: Mapping[str, FileRecord]) -> list[str]:
    """The files of a manifest whose checksum was never recorded."""
    return sorted(name for name, rec in manifest_files.items() if not rec.checksummed)
