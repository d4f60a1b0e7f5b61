"""The in-memory tier: one snapshot per ``save()`` in host shared memory, outliving the process.

A snapshot is one of our committed checkpoints, on a :class:`~ckpt_plugins.storage.local.LocalStorage`
rooted in a tmpfs (:mod:`.place`): the same tensor files, the same manifest with checksums, the same
commit by rename. Writing, verifying and reading it is therefore the code every checkpoint uses
(``persist.save_job``, ``layout.commit``, ``restore.read``), and a snapshot cut short by a SIGKILL is
a hidden temporary folder that is never listed. Because the files belong to the file system, not to
the process, they survive the process's death (not a reboot, nor the loss of the host).

Each rank's snapshot is a complete one-rank checkpoint of what that rank needs to resume: the
shared ``state`` (every rank keeps it, so a rank can resume without another host's memory) and its
``rank_state``, stored as the part ``rank_0``; ``manifest.user_metadata["memory_tier"]`` says which
rank of how many wrote it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.checksum import cores
from ckpt_plugins.files.manifest import MANIFEST_NAME, Manifest
from ckpt_plugins.files.tensor_file import FileRecord, Prehashed, read_tensor_file
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.memory.mapped import DeferredChecksums, MappedFiles, pending
from ckpt_plugins.memory.place import check_budget, check_root, folder_bytes, snapshot_root
from ckpt_plugins.memory.recycle import ReusingStorage
from ckpt_plugins.options.memory import MemoryTierOptions
from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.persist.request import collect
from ckpt_plugins.persist.save_job import Destination, SaveJob, SaveRequest
from ckpt_plugins.persist.stager import HostStager, caller_stream_mark
from ckpt_plugins.restore.select import materialize
from ckpt_plugins.restore.targets import RestoreReport

__all__ = ["MARK", "MemoryTier", "Snapshot"]

log = logging.getLogger(__name__)

MARK = "memory_tier"
"""The ``user_metadata`` key of a snapshot's manifest: ``{"rank": r, "world_size": w}``."""


class Snapshot:
    """What a snapshot holds, read back: the state, the rank state, extra files (bytes), the manifest."""

    def __init__(self, state: Any, rank_state: Any, extra_files: dict[str, bytes], manifest: Manifest) -> None:
        self.state, self.rank_state, self.extra_files, self.manifest = state, rank_state, extra_files, manifest


def _quick_problems(layout: Layout, path: str) -> list[str]:
    """The manifest parses, and every file it lists is there with its size (no checksums)."""
    try:
        manifest = layout.read_manifest(path)
    except CorruptCheckpointError as exc:
        return [str(exc)]
    problems = []
    for name, record in manifest.files.items():
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.exists(file) else None
        if size != record.size:
            problems.append(f"{file}: {'missing' if size is None else f'size {size}, manifest says {record.size}'}")
    return problems


class _NoSlot:
    """The stager a snapshot job releases its slot to: the tier stages (when it must) itself."""

    def release(self, slot: int) -> None:
        pass


class MemoryTier:
    """This rank's snapshots of one checkpoint directory (and, with peers, its ring peer's copies).

    Args:
        options: the tier's options.
        directory: the checkpoint directory (names the shared-memory folder).
        rank, world_size: this process under torch.distributed (0, 1 otherwise).
        prefix: folder names, as the directory's (``step_``; ``checkpoint-`` for the HF Trainer,
            whose loader can then read a snapshot folder as it reads its own).
        read_only: list and read only (no clean-up of leftovers: a live run may be writing).
    """

    def __init__(
        self,
        options: MemoryTierOptions,
        *,
        directory: str,
        rank: int,
        world_size: int,
        prefix: str,
        read_only: bool = False,
    ) -> None:
        check_root(options.root, options.budget_bytes)
        self.options = options
        self.rank, self.world_size = rank, world_size
        self.storage = ReusingStorage()
        self.base = snapshot_root(options.root, directory)
        self.folder = os.path.join(self.base, f"rank{rank}")
        self.layout = Layout(self.storage, self.folder, prefix)
        self.peer_layout = Layout(self.storage, os.path.join(self.folder, "peer"), prefix)
        for layout in (self.layout, self.peer_layout) if not read_only else ():
            os.makedirs(layout.root, exist_ok=True)
            layout.cleanup_leftovers()  # a snapshot a SIGKILL cut short (never while another process writes)
        self.lock = threading.Lock()  # snapshots written/pruned vs read by the peer sender
        self._stager: HostStager | None = None
        self._spare: str | None = None  # a superseded snapshot whose files the next one overwrites
        self.mapped = MappedFiles()  # every snapshot file this tier writes, mapped once (.mapped)
        self.checksums = DeferredChecksums()  # recorded after each commit, on a helper thread
        self._written: dict[str, Any] = {}  # the job in progress: file name -> its mapping
        self._copy_threads: int | None = None  # the job in progress: threads that copy (see _write_snapshot)
        self._ready: Any = None  # the job in progress: the caller's stream mark its CUDA copies wait for
        self._budget_checked = False
        self.damaged: set[str] = set()
        self.verified: set[str] = set()
        """Snapshot paths this process wrote or checked in full (manifest, sizes, checksums)."""
        self.peers: Any = None  # memory.peers.RingPeers, attached by the manager under torch.distributed
        existing = self.layout.committed()
        if existing:  # a restart: the last run's snapshot size is the best estimate of this one's
            self._check_budget(folder_bytes(existing[-1].path))

    @property
    def copies(self) -> int:
        return 2 if self.options.peers and self.world_size > 1 else 1

    def _check_budget(self, state_bytes: int) -> None:
        check_budget(
            self.options.root,
            state_bytes,
            keep=self.options.keep,
            copies=self.copies,
            budget_bytes=self.options.budget_bytes,
            held_bytes=folder_bytes(self.folder),
        )

    # --- listing -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed snapshot steps of this rank, ascending (not verified)."""
        return [c.step for c in self.layout.committed()]

    def path_for(self, step: int) -> str:
        return self.layout.path_for(step)

    def usable(self, layout: Layout | None = None, *, full: bool = True) -> list[int]:
        """Steps whose snapshot verifies (manifest, sizes, and with ``full`` the checksums), newest
        first; a damaged one is skipped with a WARNING naming the file. Snapshots this process
        wrote count as verified. ``full=False`` leaves the checksums to the read (one pass over
        the bytes instead of two; a read that finds damage calls :meth:`mark_damaged`)."""
        layout = layout or self.layout
        self.settle()
        good = []
        for ckpt in reversed(layout.committed()):
            if ckpt.path in self.damaged:
                continue
            if ckpt.path in self.verified:
                good.append(ckpt.step)
                continue
            problems = layout.verify(ckpt.path) if full else _quick_problems(layout, ckpt.path)
            if problems:
                log.warning(
                    "memory snapshot step %d (%s) is damaged, skipped: %s", ckpt.step, ckpt.path, "; ".join(problems)
                )
                continue
            unchecked = pending(layout.read_manifest(ckpt.path).files)
            if unchecked:
                log.warning(
                    "memory snapshot step %d (%s): the process that wrote it died before recording the checksums "
                    "of %s (within milliseconds of its save); it is complete (committed after the copy), but only "
                    "the sizes can be checked",
                    ckpt.step,
                    ckpt.path,
                    ", ".join(unchecked),
                )
            if full:
                self.verified.add(ckpt.path)
            good.append(ckpt.step)
        return good

    def mark_damaged(self, path: str, problem: str) -> None:
        """A read found ``path`` damaged: skip it from now on (the files stay, for inspection)."""
        log.warning("memory snapshot %s is damaged, skipped: %s", path, problem)
        self.damaged.add(path)
        self.verified.discard(path)

    # --- writing -----------------------------------------------------------------------------
    def snapshot(
        self,
        step: int,
        *,
        flat: Any,
        rank_flat: Any,
        extra_files: Mapping[str, Any] | None,
        metrics: dict[str, float],
        user_metadata: Mapping[str, Any] | None,
        retention: dict[str, Any] | None,
        submit: Callable[[SaveHandle, Callable[[SaveHandle], str]], SaveHandle] | None = None,
    ) -> SaveHandle:
        """Write and commit the snapshot of ``step``; keep the newest ``keep``; hand it to the peer
        sender. Default: on the caller's thread (the write is the one memory copy of the state) and
        the handle returned is committed. With ``submit`` (overlap mode: the manager's persist
        engine), the same job runs on the background writer, reading the live tensors, and the
        handle is staged and committed when the snapshot is (what ``wait_for_snapshot`` waits for)."""
        tensors, extra_specs = collect(flat, rank_flat, extra_files)
        if not self._budget_checked:
            self._check_budget(sum(t.numel() * t.element_size() for t in tensors.values()))
            self._budget_checked = True
        meta = {**(user_metadata or {}), MARK: {"rank": self.rank, "world_size": self.world_size}}
        request = SaveRequest(
            step=step,
            token=uuid.uuid4().hex[:12],
            name=None,
            listed=True,
            ranks_with_state=[0] if rank_flat is not None else [],
            flat=flat,
            rank_flat=rank_flat,
            tensors=tensors,
            staged=None,
            stage_in_job=False,
            slot=0,
            metrics=metrics,
            user_metadata=meta,
            extra_specs=extra_specs,
            callbacks=(),
            retention=retention,
            ready=caller_stream_mark(tensors) if submit is not None else None,
        )
        handle = SaveHandle(step, self.layout.path_for(step))
        if submit is not None:  # beside training: the copy keeps to the writer's thread
            return submit(handle, lambda h: self._write_snapshot(request, h, threads=1))
        handle._durable.set_result(self._write_snapshot(request, handle, threads=None))
        return handle

    def _write_snapshot(self, request: SaveRequest, handle: SaveHandle, threads: int | None) -> str:
        """The snapshot job: stage CUDA tensors (pinned, reused buffers), write the files into the
        spare snapshot's recycled folder (:mod:`.recycle`), commit, prune, offer it to the peer.
        ``threads``: how many threads copy (:func:`~ckpt_plugins.persist.hashed_copy.copy_threads`;
        1 in overlap mode, which must leave training its cores).
        The checksums are taken after the commit on a helper thread (:mod:`.mapped`), in both
        modes: hashing inside an overlap job made it outlast a short forward/backward, so
        ``wait_for_snapshot`` waited for the hash (docs/memory_tier.md)."""
        step, tensors, slot = request.step, request.tensors, None
        on_gpu = any(t.is_cuda for t in tensors.values())
        # CUDA tensors go straight into the files (.mapped), unless an extra file is written
        # from host copies ("staged": torch.save of the tensors) or a tensor is not contiguous.
        direct = not any(spec[0] == "staged" for spec in request.extra_specs.values())
        if any(not t.is_contiguous() for t in tensors.values()) or (on_gpu and not direct):
            self._stager = self._stager or HostStager(1)
            slot = self._stager.acquire()
            assert slot is not None  # a blocking acquire
            staged = self._stager.stage(slot, tensors, after=request.ready)  # pinned, reused host buffers
            staged.wait()
            request = dataclasses.replace(request, tensors=staged.tensors)
        manifests: list[Manifest | None] = []
        dest = Destination(self.storage, self.layout, self._write, False, 0, 1, 60.0)
        inner = SaveHandle(step, handle.path)  # the job's own; the caller's is settled by the caller
        try:
            with self.lock:
                self.checksums.settle()  # the previous snapshot's: its folder may be renamed below
                self._written, self._copy_threads, self._ready = {}, threads, request.ready
                before = self.steps()
                for later in [s for s in before if s > step]:
                    log.info("removing memory snapshot step %d: superseded by a save of step %d", later, step)
                    self.layout.delete(later)
                spare, self._spare = self._spare, None
                if spare is not None and os.path.isdir(spare):
                    self.storage.recycle(spare, self.layout.new_temp_dir(step, request.token))
                job = SaveJob(request, dest, _NoSlot(), done=lambda _r, m: manifests.append(m))  # type: ignore[arg-type]
                path = job(inner)
                committed = manifests[-1] if manifests else None
                written: set[str] = {MANIFEST_NAME, *committed.files} if committed is not None else set()
                for name in os.listdir(path) if committed is not None else ():
                    if name not in written:  # a recycled file not written again
                        os.remove(os.path.join(path, name))
                self.verified.add(path)
                steps = sorted({s for s in before if s < step} | {step})  # what is committed now
                for old in steps[: -self.options.keep]:
                    self._retire(old)
                kept = [self.layout.path_for(s) for s in steps[-self.options.keep :]]
                self.verified &= set(kept)
                self.mapped.keep_only([*kept, *([self._spare] if self._spare else [])])
                peers = self.peers
                assert committed is not None  # the job raised otherwise
                if pending(committed.files):
                    self.checksums.submit(
                        path,
                        committed,
                        self._written,
                        then=None if peers is None else lambda p: peers.offer(step, p),
                        threads=max(1, cores() - 1) if on_gpu else 1,  # a GPU step leaves the cores free
                    )
                elif peers is not None:
                    peers.offer(step, path)
        finally:
            if slot is not None and self._stager is not None:
                self._stager.release(slot)
        handle.stats.update(inner.stats)
        return path

    def settle(self) -> None:
        """Wait until the newest snapshot's checksums are in its manifest (:mod:`.mapped`)."""
        self.checksums.settle()

    def _retire(self, step: int) -> None:
        """A snapshot no longer kept: the spare (its pages reused by the next one), or removed."""
        if self._spare is not None:
            self.layout.delete(step)
            return
        spare = self.layout.new_temp_dir(step, "spare-" + uuid.uuid4().hex[:8])
        os.rename(self.layout.path_for(step), spare)  # hidden at once: never listed again
        self._spare = spare

    def _write(
        self,
        path: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        slot: int | None,
        prehashed: Prehashed | None = None,
    ) -> FileRecord:
        record, mapping = self.mapped.write(path, tensors, metadata, threads=self._copy_threads, after=self._ready)
        self._written[os.path.basename(path)] = mapping
        return record

    # --- reading -----------------------------------------------------------------------------
    def read(self, step: int, *, map_location: str | torch.device = "cpu", verify: bool = True) -> Snapshot:
        """The whole snapshot of ``step`` as it was saved (for persisting it to the directory)."""
        self.settle()
        path = self.layout.path_for(step)
        manifest = self.layout.read_manifest(path)

        def part(name: str) -> Any:
            entry = manifest.parts.get(name)
            if entry is None:
                return None

            def tensors(keys: set[str] | None) -> Mapping[str, torch.Tensor]:
                if entry.tensor_file is None or keys == set():
                    return {}
                file = os.path.join(path, entry.tensor_file)
                expected = manifest.files[entry.tensor_file] if verify else None
                return read_tensor_file(self.storage, file, keys=keys, expected=expected, map_location=map_location)

            return materialize(entry.tree, tensors, selector=None, rename=None, report=RestoreReport(source=path))

        own = {p.tensor_file for p in manifest.parts.values() if p.tensor_file}
        extra = {}
        for name in manifest.files:
            if name not in own:
                with open(os.path.join(path, name), "rb") as f:
                    extra[name] = f.read()
        if verify:
            problems = self.layout.verify(path)
            if problems:
                raise CorruptCheckpointError("; ".join(problems))
        manifest = dataclasses.replace(
            manifest, user_metadata={k: v for k, v in manifest.user_metadata.items() if k != MARK}
        )
        return Snapshot(part("state"), part("rank_0"), extra, manifest)

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the peer transfer (after the last snapshot has been sent)."""
        self.settle()
        if self.peers is not None:
            self.peers.close()
            self.peers = None

    def discard(self) -> None:
        """Free the memory: remove this rank's snapshots and peer copies (and the directory's folder
        once no rank has one left)."""
        self.settle()
        self.mapped.close()
        self.storage.remove_tree(self.folder) if os.path.exists(self.folder) else None
        try:
            os.rmdir(self.base)
        except OSError:
            pass  # another rank's folder is still there
