"""Snapshot: copy the state's tensors into host buffers that are allocated once and reused.

The time a save blocks training has a floor: one copy of the state into memory that already
exists. Allocating fresh memory on every save (``clone()``, ``.cpu()``) costs page faults that are
often several times the copy itself, so each staging slot keeps one buffer per tensor key and
reuses it while keys, shapes and dtypes stay the same.

A slot's buffers (its arena) are views into one page-aligned block per file (``state/``,
``rank/``, ``extra/<name>/``), laid out in the order :mod:`.tensor_file` writes them (largest
element size first). A tensor file's data is then one contiguous, aligned run of memory, which the writer
hands to the disk with ``O_DIRECT`` without another copy (:mod:`.direct_io`), and a writer process
receives the blocks once instead of one shared-memory segment per tensor per save.

Given the header of a tensor file (``heads``), the stager also checksums that file during the
copy, on a second thread (:mod:`.hashed_copy`), instead of leaving the writer a second pass over
the whole state while training runs. The digest travels with the staged state
(:class:`~ckpt_plugins.files.tensor_file.Prehashed`).

CUDA tensors go to pinned memory with ``non_blocking`` copies on a side stream, so the device to
host copy overlaps with compute; :meth:`StagedState.wait` synchronises that stream's event. CPU
tensors are copied by ``memmove`` in chunks that threads claim one at a time (:mod:`.hashed_copy`):
every core copies and hashes while the caller waits, and unlike ``Tensor.copy_``'s fixed halves a
thread that other processes have pushed off its core only takes fewer chunks (on 2 busy cores
``copy_`` of the 517 MiB benchmark state took 260-600 ms). A stage that runs beside training
(overlap mode, on the writer) passes ``threads=1``.

With a writer process the arena lives in shared memory instead (not pinned: CUDA copies into
it are then synchronous). There are ``slots`` arenas: at most that many staged copies exist at
once, which is what bounds host memory with ``max_pending`` saves in flight.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_plugins.files.tensor_file import Prehashed, file_order
from ckpt_plugins.persist.hashed_copy import copy_and_hash, copy_pieces
from ckpt_plugins.storage.direct_io import ALIGN

__all__ = ["Arena", "HostStager", "StagedState", "arena_layout", "caller_stream_mark", "file_group", "wait_for_caller"]

log = logging.getLogger(__name__)


@dataclass
class StagedState:
    """Tensors copied into a slot's buffers; ``event`` is set once the copies are complete.
    ``digests``: per file group given a header, the file's checksum taken during the copy."""

    slot: int
    tensors: dict[str, torch.Tensor]
    cuda_event: object | None = None
    done: threading.Event = field(default_factory=threading.Event)
    digests: dict[str, Prehashed] = field(default_factory=dict)

    def wait(self) -> None:
        if self.cuda_event is not None:
            self.cuda_event.synchronize()  # type: ignore[attr-defined]
        self.done.set()


@dataclass
class Arena:
    """One slot's staging memory: one page-aligned uint8 block per file group (``memory``), and
    a view per tensor key into its group's block. ``generation`` changes whenever the arena is
    reallocated."""

    memory: dict[str, torch.Tensor]
    views: dict[str, torch.Tensor]
    signature: tuple[Any, ...]
    generation: int
    order: dict[str, list[str]] = field(default_factory=dict)
    """Per group, its keys in the order they lie in its block (the file's order)."""

    def locate(self, tensor: torch.Tensor) -> tuple[str, int] | None:
        """(group, byte offset) of a tensor that lies inside one of the blocks, else None."""
        nbytes = tensor.numel() * tensor.element_size()
        for group, block in self.memory.items():
            offset = tensor.data_ptr() - block.data_ptr() if nbytes else 0
            if 0 <= offset <= block.numel() - nbytes:
                return group, offset
        return None


def file_group(key: str) -> str:
    """Which file a staged key is written to: ``state``, ``rank`` or ``extra/<name>``."""
    head, _, rest = key.partition("/")
    return f"extra/{rest.partition('/')[0]}" if head == "extra" else head


def caller_stream_mark(tensors: Mapping[str, torch.Tensor]) -> Any | None:
    """An event recorded now on the caller's current CUDA stream when any tensor is on the GPU,
    else None. A copy staged later on another thread (overlap mode) waits for this event, not for
    that thread's current stream: by then the caller has queued the next forward/backward, and
    waiting for it would run the copy after the compute instead of beside it."""
    if not any(t.is_cuda for t in tensors.values()):
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record()
    return event


def wait_for_caller(stream: torch.cuda.Stream, after: Any | None) -> None:
    """Make ``stream``'s next copies wait for ``after`` (a :func:`caller_stream_mark`), or else
    for the work queued so far on this thread's current stream of the same device."""
    if after is not None:
        stream.wait_event(after)
    else:
        stream.wait_stream(torch.cuda.current_stream(stream.device))


def arena_layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Per file group: (key, byte offset) in :func:`.tensor_file.file_order` and the group's
    size.

    Each group gets its own block: a file written by ``torch.save`` (an extra file of staged
    tensors) stores whole storages, so its tensors must not share one with other files'."""
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(file_group(key), []).append(key)
    out = {}
    for group, keys in groups.items():
        placed, offset = [], 0
        for key in file_order({k: tensors[k] for k in keys}):
            placed.append((key, offset))
            offset += tensors[key].numel() * tensors[key].element_size()
        out[group] = (placed, offset)
    return out


def _aligned_bytes(nbytes: int, pin: bool, shared: bool) -> torch.Tensor:
    """``nbytes`` of uint8 starting on a page boundary (pinned or shared on request), whose
    storage is exactly the block wherever the allocator allows it.

    The storage matters, not only the tensor: ``torch.save`` of staged tensors (``optimizer.pt``)
    writes each tensor's whole storage. An over-allocated storage sliced to alignment would start
    before the block (so its bytes could never go to disk from where they are, only through one
    more copy) and would add the slack's uninitialised bytes to the file. Plain host memory is
    therefore an anonymous mapping of exactly ``nbytes`` (page-aligned by construction); pinned
    and shared memory come from their allocators, over-allocated only if those return an
    unaligned address."""
    if not pin and not shared:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # the tensor keeps the mapping

    def allocate(size: int) -> torch.Tensor:
        raw = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        if shared:
            raw.share_memory_()  # type: ignore[no-untyped-call]
        return raw

    raw = allocate(nbytes)
    if raw.data_ptr() % ALIGN == 0:
        return raw
    raw = allocate(nbytes + ALIGN)
    start = -raw.data_ptr() % ALIGN
    return raw[start : start + nbytes]


class HostStager:
    """A pool of ``slots`` reusable staging arenas."""

    def __init__(self, slots: int, shared: bool = False) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.shared = shared  # arenas in shared memory, for a writer process
        self._arenas: list[Arena | None] = [None] * slots
        self._generation = 0
        self._free = list(range(slots))
        self._cond = threading.Condition()
        self._stream: torch.cuda.Stream | None = None

    @property
    def slots(self) -> int:
        return len(self._arenas)

    def acquire(self, block: bool = True) -> int | None:
        """Take a free slot; wait for one when ``block``, else return None if all are busy."""
        with self._cond:
            while not self._free:
                if not block:
                    return None
                self._cond.wait()
            return self._free.pop(0)

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def arena(self, slot: int) -> Arena | None:
        return self._arenas[slot]

    def staged_bytes(self) -> int:
        """Host memory held by all slots' arenas."""
        return sum(block.numel() for a in self._arenas if a is not None for block in a.memory.values())

    def stage(
        self,
        slot: int,
        tensors: Mapping[str, torch.Tensor],
        heads: Mapping[str, bytes] | None = None,
        threads: int | None = None,
        after: Any | None = None,
    ) -> StagedState:
        """Copy ``tensors`` into ``slot``'s arena (reallocated only when keys, shapes or dtypes
        changed). ``heads``: ``{file group: header bytes}`` of files to checksum during the copy
        (CPU tensors only; CUDA copies are asynchronous). ``threads``: how many threads copy CPU
        tensors (default: one per core, :func:`~.hashed_copy.copy_threads`). ``after``: a
        :func:`caller_stream_mark` the CUDA copies wait for (default: the work queued so far on
        this thread's current stream)."""
        uses_cuda = any(t.is_cuda for t in tensors.values())
        arena = self._arena_for(slot, tensors, pin=uses_cuda and not self.shared)
        stream = self._side_stream() if uses_cuda else None
        digests: dict[str, Prehashed] = {}
        with torch.no_grad():
            if stream is not None:
                wait_for_caller(stream, after)
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                if uses_cuda:
                    for key, src in tensors.items():
                        arena.views[key].copy_(src.detach(), non_blocking=src.is_cuda)
                for group, keys in arena.order.items() if not uses_cuda else ():
                    pairs = [(arena.views[k], tensors[k]) for k in keys]
                    head = (heads or {}).get(group)
                    if head is None:
                        copy_pieces(pairs, threads)
                        continue
                    block = arena.memory[group]
                    digest = copy_and_hash(pairs, head, block, threads)
                    digests[group] = Prehashed(head, block.data_ptr(), block.numel(), digest)
        event = None
        if stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return StagedState(slot=slot, tensors={k: arena.views[k] for k in tensors}, cuda_event=event, digests=digests)

    def reserve(self, slot: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Allocate ``slot``'s arena for tensors of these keys, shapes and dtypes and touch every
        page of it now (nothing is copied), so that the first :meth:`stage` into it costs only the
        copy: the first touch of fresh host memory (page faults, the kernel zeroing each page)
        costs several times the copy. False when the arena was already allocated."""
        uses_cuda = any(t.is_cuda for t in tensors.values())
        existing = self._arenas[slot]
        arena = self._arena_for(slot, tensors, pin=uses_cuda and not self.shared)
        if arena is existing:
            return False
        for block in arena.memory.values():
            block.zero_()
        return True

    def _arena_for(self, slot: int, tensors: Mapping[str, torch.Tensor], pin: bool) -> Arena:
        signature = (pin, *((k, tuple(t.shape), t.dtype) for k, t in tensors.items()))
        arena = self._arenas[slot]
        if arena is not None and arena.signature == signature:
            return arena
        self._arenas[slot] = None  # free the old arena before allocating the new one
        memory, views, order, total = {}, {}, {}, 0
        for group, (placed, size) in arena_layout(tensors).items():
            block = memory[group] = _aligned_bytes(size, pin, self.shared)
            order[group] = [key for key, _ in placed]
            total += size
            for key, offset in placed:
                src = tensors[key]
                nbytes = src.numel() * src.element_size()
                views[key] = block[offset : offset + nbytes].view(src.dtype).view(src.shape)
        with self._cond:  # reserve() allocates on the writer while save() may stage another slot
            self._generation += 1
            generation = self._generation
        arena = Arena(memory, views, signature, generation, order)
        self._arenas[slot] = arena
        log.info(
            "allocated %.1f MiB of staging memory (slot %d); %.1f MiB staged in all",
            total / 2**20,
            slot,
            self.staged_bytes() / 2**20,
        )
        return arena

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        return self._stream
