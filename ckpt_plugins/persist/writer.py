"""The writer side of a ``CheckpointManager``, in one object.

A :class:`Persister` owns what a save needs after the state has been flattened: the host stager
(reused staging buffers), the persist engine (the writer thread), the optional writer process,
the set of steps in flight and the ordering check against them, and the error reporting of
``wait()``. The manager keeps the directory, the records and retention, and calls this.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt_plugins.distributed import agree_on_save, all_gather_object
from ckpt_plugins.errors import SaveError
from ckpt_plugins.files.manifest import Manifest
from ckpt_plugins.files.tensor_file import FileRecord, Prehashed, write_tensor_file
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.options import SaveOptions
from ckpt_plugins.persist.engine import PersistEngine, SaveHandle
from ckpt_plugins.persist.request import collect, stage_now
from ckpt_plugins.persist.save_job import Destination, SaveJob, SaveRequest, file_heads
from ckpt_plugins.persist.stager import HostStager, caller_stream_mark
from ckpt_plugins.persist.writer_process import ProcessWriter
from ckpt_plugins.storage.base import Storage

__all__ = ["Persister"]

log = logging.getLogger(__name__)

Done = Callable[[SaveRequest, "Manifest | None"], None]


class Persister:
    """Stager, engine, writer process and the saves in flight of one manager.

    ``lock`` is the manager's state lock: it guards ``in_flight`` and ``replaceable`` together with
    the manager's records, so that the ordering check sees one consistent picture. ``done`` is the
    manager's completion callback (``SaveJob(done=...)``).
    """

    def __init__(
        self,
        saving: SaveOptions,
        *,
        storage: Storage,
        layout: Layout,
        direct_io: bool,
        rank: int,
        world_size: int,
        rank_timeout: float,
        overwrite: bool,
        directory: str,
        lock: threading.Lock,
        done: Done,
    ) -> None:
        self.saving = saving
        self.layout = layout
        self.storage = storage
        self.direct_io = direct_io
        self.rank, self.world_size = rank, world_size
        self.overwrite, self.directory = overwrite, directory
        self.lock = lock
        self.done = done
        self.stager = HostStager(saving.max_pending, shared=saving.writer == "process")
        self.process_writer = ProcessWriter(direct_io, self.stager) if saving.writer == "process" else None
        self.engine = PersistEngine(
            async_save=saving.async_save, writer_nice=saving.writer_nice, on_error=saving.on_error
        )
        self.destination = Destination(storage, layout, self.write_tensors, direct_io, rank, world_size, rank_timeout)
        self.in_flight: set[int] = set()
        self.in_flight_names: Counter[str] = Counter()  # a name may be saved again while in flight
        self.replaceable: frozenset[int] = frozenset()  # start_run: an earlier run's later steps
        self.last_handle: SaveHandle | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, obj: Any) -> list[Any]:
        return all_gather_object(obj) if self.world_size > 1 else [obj]

    def agree(
        self,
        step: int,
        *,
        has_rank_state: bool,
        unstorable: str | None,
        name: str | None,
        listed: bool = True,
        shards: tuple[int, str, int] = (0, "", 0),
    ) -> tuple[str, list[int], list[int], str | None]:
        """Check the step against what exists and (distributed) that every rank agrees (one
        all_gather of a small fixed-size view per rank); return the token, the ranks with
        ``rank_state``, the ranks writing sharded chunks and rank 0's name (a name made from
        metrics may differ between ranks; every rank writes into rank 0's folder)."""
        own_error = self.engine.take_error(distributed=self.distributed, refuse=True)
        conflict = self.order_conflict(step) if self.rank == 0 and listed else None
        view = (step, own_error, conflict, uuid.uuid4().hex[:12], has_rank_state, unstorable, shards, name)
        views = self.gather(view)
        token, ranks_with_state, ranks_with_shards = agree_on_save(views)
        return token, ranks_with_state, ranks_with_shards, views[0][7]

    def name_in_flight(self, name: str) -> bool:
        """A save to ``name`` was submitted and has not finished (its name is taken)."""
        with self.lock:
            return self.in_flight_names[name] > 0

    def order_conflict(self, step: int) -> str | None:
        with self.lock:
            later = sorted(
                {s for s in self._steps() if s >= step and s not in self.replaceable}
                | {s for s in self.in_flight if s >= step}
            )
        if later and not self.overwrite:
            return (
                f"cannot save step {step} in {self.directory}: checkpoint(s) at step(s) {later} "
                "already exist or are being saved, at or after it. Use a larger step, or "
                "overwrite=True to replace them (later checkpoints are then removed)."
            )
        return None

    def _steps(self) -> list[int]:
        return [c.step for c in self.layout.committed()]

    def write_tensors(
        self,
        path: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        slot: int | None,
        prehashed: Prehashed | None = None,
    ) -> FileRecord:
        if self.process_writer is not None:
            return self.process_writer.write(path, tensors, metadata, slot)
        return write_tensor_file(self.storage, path, tensors, metadata, direct_io=self.direct_io, prehashed=prehashed)

    def save(
        self,
        step: int,
        *,
        token: str,
        ranks_with_state: list[int],
        ranks_with_shards: list[int] | None = None,
        flat: Any,
        rank_flat: Any,
        extra_files: Mapping[str, Any] | None,
        name: str | None,
        listed: bool,
        metrics: dict[str, float],
        user_metadata: Mapping[str, Any] | None,
        on_commit: Callable[[int, str], None] | None,
        retention: dict[str, Any] | None,
        on_stats: Callable[[dict[str, float]], None],
        dedup: Any = None,
        wait: bool = False,
    ) -> SaveHandle | None:
        """Stage and submit one agreed save; None when skipped (``on_busy="skip"``, every slot in flight).
        ``on_stats`` gets the handle's stats as soon as they exist (``last_save_stats``).
        ``wait``: return once it is committed, as a synchronous save; the thread writer then reads
        the live tensors, so there is no staging copy (the caller does not touch them meanwhile)."""
        saving = self.saving
        # A writer process reads staged shared memory only: it stages (and then waits) as always.
        background = saving.async_save and not (wait and self.process_writer is None)
        slot = self.stager.acquire(block=saving.on_busy == "wait")
        if slot is None:
            log.warning(
                "skipping the save of step %d: %d save(s) still in flight (on_busy='skip')", step, self.stager.slots
            )
            return None
        t0 = time.perf_counter()
        tensors, extra_specs = collect(flat, rank_flat, extra_files)
        # The thread writer gets each file's checksum from the copy; a writer process hashes as it
        # writes, on its own interpreter.
        hash_in_stage = self.process_writer is None
        staged = stage_now(
            self.stager,
            slot,
            tensors,
            snapshot=saving.snapshot if background else "safe",  # waited for: no job stages CUDA tensors
            async_save=background,
            heads=(lambda: file_heads(tensors, extra_specs, dedup=dedup)) if hash_in_stage else None,
        )
        stage_in_job = saving.snapshot == "overlap" and background
        handle = SaveHandle(step, self.layout.path_for(step, name))
        handle.stats.update(step=step, bytes=float(sum(t.numel() * t.element_size() for t in tensors.values())))
        on_stats(handle.stats)
        request = SaveRequest(
            step=step,
            token=token,
            name=name,
            listed=listed,
            ranks_with_state=ranks_with_state,
            ranks_with_shards=ranks_with_shards or [],
            flat=flat,
            rank_flat=rank_flat,
            tensors=tensors,
            staged=staged,
            stage_in_job=stage_in_job,
            slot=slot,
            metrics=metrics,
            user_metadata=dict(user_metadata or {}),
            extra_specs=extra_specs,
            callbacks=saving.callbacks + ((on_commit,) if on_commit else ()),
            retention=retention,
            dedup=dedup,
            hash_in_stage=hash_in_stage,
            ready=caller_stream_mark(tensors) if stage_in_job else None,
        )
        with self.lock:
            if listed:
                self.in_flight.add(step)
            if name is not None:
                self.in_flight_names[name] += 1
        try:
            self.last_handle = self.engine.submit(
                handle, SaveJob(request, self.destination, self.stager, done=self.done)
            )
        except BaseException:
            self.stager.release(slot)
            self.done(request, None)
            raise
        if not saving.async_save or wait:
            self.engine.report(handle, distributed=self.distributed)
            if self.distributed:
                self.wait()  # a synchronous save returns on every rank once rank 0 has committed
        handle.stats["stall_s"] = time.perf_counter() - t0  # a save waited for blocks for all of it
        return handle

    def prepare(self, flat: Any, rank_flat: Any, extra_files: Mapping[str, Any] | None) -> bool:
        """Queue the allocation of the staging memory a save of these tensors will use
        (:meth:`.HostStager.reserve`) on the writer, behind the saves in flight; False when every
        slot is busy. Best effort: a failure is logged, and the save allocates as it would have."""
        tensors, _ = collect(flat, rank_flat, extra_files)
        if not tensors:
            return False
        slot = self.stager.acquire(block=False)
        if slot is None:
            return False
        handle = SaveHandle(-1, self.directory)
        handle._reported = True  # never fails: nothing to report

        def job(h: SaveHandle) -> str:
            h._staged.set_result(None)
            t0 = time.perf_counter()
            try:
                if self.stager.reserve(slot, tensors):
                    log.debug("staging memory prepared in %.1f ms", (time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # e.g. out of memory: the first save allocates (and fails) itself
                log.warning("could not prepare the staging memory ahead of the first save: %s", exc)
            finally:
                self.stager.release(slot)
            return self.directory

        try:
            self.engine.submit(handle, job)
        except BaseException:
            self.stager.release(slot)
            raise
        return True

    def delete(self, step: int, path: str) -> SaveHandle:
        """Queue the removal of ``path`` after every save submitted so far (rank 0 removes it);
        reported at once when not async."""
        handle = SaveHandle(step, path)

        def job(h: SaveHandle) -> str:
            h._staged.set_result(None)
            if self.rank == 0:
                self.layout.delete_path(path)
            return path

        self.engine.submit(handle, job)
        if not self.saving.async_save:
            self.engine.report(handle, distributed=self.distributed)
        return handle

    def wait(self) -> None:
        """Block until every pending save is committed; raise the first error not yet seen."""
        self.engine.flush()
        own_error = self.engine.take_error(distributed=self.distributed)
        errors = [f"rank {r}: {e}" for r, e in enumerate(self.gather(own_error)) if e]
        if errors:
            raise SaveError("a save failed; " + "; ".join(errors))

    def wait_for_snapshot(self) -> None:
        """Overlap mode: block until the last save has copied the state."""
        if self.last_handle is not None and not self.last_handle._staged.done():
            try:
                self.last_handle.wait_staged()
            except BaseException:
                pass

    def close(self) -> None:
        """Flush pending saves, stop the writer (thread and process); raise a pending save error."""
        self.engine.shutdown()
        if self.process_writer is not None:
            self.process_writer.close()
        self.engine.take_error(distributed=self.distributed)
