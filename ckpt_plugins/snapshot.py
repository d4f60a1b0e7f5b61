"""Snapshot: copy the state's tensors into host buffers that are allocated once and reused.

The time a save blocks training has a floor: one copy of the state into memory that already
exists. Allocating fresh memory on every save (``clone()``, ``.cpu()``) costs page faults that are
often several times the copy itself, so each staging slot keeps one buffer per tensor key and
reuses it while shapes and dtypes stay the same.

CUDA tensors go to pinned buffers with ``non_blocking`` copies on a side stream, so the device to
host copy overlaps with compute; :meth:`StagedState.wait` synchronises that stream's event. CPU
tensors are copied with ``Tensor.copy_`` (multi-threaded inside torch, no Python loop over data).

With a writer process the buffers live in shared memory instead (not pinned: CUDA copies into
them are then synchronous). There are ``slots`` buffer sets: at most that many staged copies exist at once, which is what
bounds host memory with ``max_pending`` saves in flight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["HostStager", "StagedState"]

log = logging.getLogger(__name__)


@dataclass
class StagedState:
    """Tensors copied into a slot's buffers; ``event`` is set once the copies are complete."""

    slot: int
    tensors: dict[str, torch.Tensor]
    cuda_event: object | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> None:
        if self.cuda_event is not None:
            self.cuda_event.synchronize()  # type: ignore[attr-defined]
        self.done.set()


class HostStager:
    """A pool of ``slots`` reusable host-buffer sets."""

    def __init__(self, slots: int, shared: bool = False) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.shared = shared  # buffers in shared memory, for a writer process
        self._buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self._free = list(range(slots))
        self._cond = threading.Condition()
        self._stream = None

    @property
    def slots(self) -> int:
        return len(self._buffers)

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

    def staged_bytes(self) -> int:
        """Host memory held by all slots' buffers."""
        return sum(t.numel() * t.element_size() for slot in self._buffers for t in slot.values())

    def stage(self, slot: int, tensors: Mapping[str, torch.Tensor]) -> StagedState:
        """Copy ``tensors`` into ``slot``'s buffers (reallocating only where shape/dtype changed)."""
        buffers = self._buffers[slot]
        for stale in buffers.keys() - tensors.keys():
            del buffers[stale]
        staged: dict[str, torch.Tensor] = {}
        uses_cuda = any(t.is_cuda for t in tensors.values())
        stream = self._side_stream() if uses_cuda else None
        grown = 0
        with torch.no_grad():
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                for key, src in tensors.items():
                    buf = buffers.get(key)
                    if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                        buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda and not self.shared)
                        if self.shared:
                            buf.share_memory_()
                        buffers[key] = buf
                        grown += buf.numel() * buf.element_size()
                    buf.copy_(src.detach(), non_blocking=src.is_cuda)
                    staged[key] = buf
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        if grown:
            log.info("allocated %.1f MiB of staging buffers (slot %d); %.1f MiB staged in all",
                     grown / 2**20, slot, self.staged_bytes() / 2**20)
        return StagedState(slot=slot, tensors=staged, cuda_event=event)

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

