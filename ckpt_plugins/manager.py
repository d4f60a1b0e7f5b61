"""CheckpointManager: save, keep, restore. The one core every adapter is built on.

``save(step, state)`` flattens the state (no pickle), copies its tensors into reused host buffers
(``snapshot``), and hands a job to the persist engine, which writes the files into a hidden
folder, commits it atomically (``layout``), then applies the retention policy. ``restore`` picks a
checkpoint (latest, best, a step or a path), falls back past damaged ones when asked for
"latest", and reads only what was selected.

Under ``torch.distributed`` every rank calls ``save`` with the same step. The ranks agree on the
step (and report earlier failures) through one ``all_gather`` on the calling thread; then rank 0
writes the replicated state, each rank writes its own ``rank_state`` into the same hidden folder
and a small ``rank_N.part.json`` when done, and rank 0 commits once every part is there. Rank 0
alone takes the lock, cleans up, commits and deletes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Any, BinaryIO, Literal

import torch

from ckpt_plugins.dedup.index import open_index
from ckpt_plugins.distributed import rank_and_world
from ckpt_plugins.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ckpt_plugins.files.extra_files import StagedFile, TensorFile
from ckpt_plugins.files.manifest import Manifest
from ckpt_plugins.layout.commit import Layout, check_folder_name
from ckpt_plugins.layout.lock import DirectoryLock
from ckpt_plugins.layout.run_start import check_run_start
from ckpt_plugins.memory.hooks import open_tier
from ckpt_plugins.options import (
    DistributedOptions,
    IOOptions,
    ManagerOptions,
    MirrorOptions,
    PreemptionOptions,
    RestoreOptions,
    RetentionOptions,
    SaveOptions,
)
from ckpt_plugins.options.checks import check_directory, check_step, check_storage_options
from ckpt_plugins.options.memory import MemoryTierOptions, memory_options_of
from ckpt_plugins.options.model import assemble, policy_of
from ckpt_plugins.persist import exit_hooks
from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.persist.mirror import open_mirror
from ckpt_plugins.persist.preemption import PreemptionWatch
from ckpt_plugins.persist.request import check_save_arguments, flatten_parts
from ckpt_plugins.persist.save_job import SaveRequest
from ckpt_plugins.persist.writer import Persister
from ckpt_plugins.restore.choose import candidates
from ckpt_plugins.restore.select import check_rename, check_strict, make_selector
from ckpt_plugins.restore.targets import RestoreReport
from ckpt_plugins.retention.policy import (
    CheckpointRecord,
    RetentionContext,
    RetentionDecision,
    RetentionPolicy,
    best_step,
    policy_flags,
)
from ckpt_plugins.sharded.save import summary as shard_summary
from ckpt_plugins.storage import open_storage
from ckpt_plugins.storage.direct_io import direct_io_enabled

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)

Which = Literal["latest", "best"] | int | str | os.PathLike[str]


class CheckpointManager:
    """Crash-safe checkpoints in one directory, with retention, async saving and restore.

    Args:
        directory: a local path or an fsspec URL (``memory://run1``, ``s3://bucket/run1``).
        keep_last, keep_best, monitor, mode, keep_every_n_steps, keep_time_interval, overwrite:
            retention (:class:`~ckpt_plugins.options.RetentionOptions`): which checkpoints are kept,
            and whether a save may go back in steps.
        async_save, max_pending, on_busy, snapshot, on_commit, on_error, writer, writer_nice:
            saving (:class:`~ckpt_plugins.options.SaveOptions`): background saves, how many at
            once, who writes. ``snapshot="overlap"`` needs :meth:`wait_for_snapshot` before the
            next ``optimizer.step()``.
        direct_io, dir_prefix, name_template, read_only, dedup: the directory
            (:class:`~ckpt_plugins.options.IOOptions`); ``name_template`` names checkpoints from
            their step and metrics (``"epoch={epoch}-step={step}{version}.ckpt"``) instead of
            ``<dir_prefix><step>``; ``dedup=True`` stores tensors unchanged since the previous
            checkpoint once (docs/dedup.md).
        distributed, rank_timeout: under ``torch.distributed``
            (:class:`~ckpt_plugins.options.DistributedOptions`); ``distributed=False`` makes a
            world of one, for code that saves on one rank only (Lightning's CheckpointIO).
        verify, strict: restore defaults (:class:`~ckpt_plugins.options.RestoreOptions`).
        save_on_preemption, preemption_signals, preemption_sync_every: what a preemption signal
            does while a loop polls :meth:`preemption_requested`
            (:class:`~ckpt_plugins.options.PreemptionOptions`, docs/preemption.md).
        options: every option at once, a :class:`~ckpt_plugins.options.ManagerOptions`.
        retention_options, save_options, io_options, distributed_options, restore_options: one
            group as an object instead of its keywords.
        policy: a ready :class:`~ckpt_plugins.retention.RetentionPolicy` instead of the
            ``keep_*`` keywords (``monitor``/``mode`` still rank for ``best_step``).
        storage_options: passed to the fsspec file system of a URL ``directory`` (for ``s3://``:
            ``client_kwargs={"endpoint_url": ...}``, ``key``/``secret``, ``profile``, ...); never
            stored, logged or written into a checkpoint. See docs/storage.md.
        mirror, keep_local: the local-first tier (:class:`~ckpt_plugins.options.MirrorOptions`,
            or ``mirror_options=``): saves commit to the local directory ``mirror``, are uploaded
            to ``directory`` in the background, and the newest ``keep_local`` stay local too
            (``self.mirror``: :class:`~ckpt_plugins.persist.mirror.Mirror`). See docs/storage.md.
        memory_tier: ``True`` or a :class:`~ckpt_plugins.options.MemoryTierOptions`: every save
            also writes a snapshot into host shared memory that outlives the process;
            ``latest_step()``/``restore("latest")`` pick the newest of memory and disk
            (docs/memory_tier.md).
        persist_every_n_steps: with ``memory_tier``, only saves of steps divisible by this are
            written to ``directory`` (default 1: every save is).

    Each option is documented on its group and in docs/options.md. Every option is checked here,
    before the directory is touched: a bad value is a :class:`~ckpt_plugins.errors.ConfigError`
    naming it (``exc.option``), with the value and the fix.

    Example:
        >>> with CheckpointManager("runs/demo", keep_last=3) as mgr:  # doctest: +SKIP
        ...     mgr.save(100, {"model": model.state_dict()}, metrics={"loss": 0.3})
        ...     state = mgr.restore("latest")
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_every_n_steps: int | None = None,
        keep_time_interval: float | timedelta | None = None,
        overwrite: bool = False,
        async_save: bool = False,
        max_pending: int = 1,
        on_busy: Literal["wait", "skip"] = "wait",
        snapshot: Literal["safe", "overlap"] = "safe",
        on_commit: Callable[[int, str], None] | Iterable[Callable[[int, str], None]] | None = None,
        on_error: Literal["raise", "warn"] = "raise",
        verify: bool = True,
        read_only: bool = False,
        rank_timeout: float = 600.0,
        writer: Literal["thread", "process"] = "thread",
        writer_nice: int = 0,
        direct_io: bool = True,
        distributed: bool = True,
        dir_prefix: str = "step_",
        name_template: str | None = None,
        strict: bool = True,
        mirror: str | os.PathLike[str] | None = None,
        keep_local: int = 1,
        dedup: bool = False,
        save_on_preemption: bool = True,
        preemption_signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
        preemption_sync_every: int = 10,
        options: ManagerOptions | None = None,
        retention_options: RetentionOptions | None = None,
        save_options: SaveOptions | None = None,
        io_options: IOOptions | None = None,
        distributed_options: DistributedOptions | None = None,
        restore_options: RestoreOptions | None = None,
        mirror_options: MirrorOptions | None = None,
        preemption_options: PreemptionOptions | None = None,
        policy: RetentionPolicy | None = None,
        storage_options: Mapping[str, Any] | None = None,
        memory_tier: bool | MemoryTierOptions = False,
        persist_every_n_steps: int | None = None,
    ) -> None:
        check_directory("directory", directory)
        self.memory_options, persist_every = memory_options_of(memory_tier, persist_every_n_steps)
        check_storage_options("storage_options", storage_options)
        if isinstance(on_commit, Iterable) and not isinstance(on_commit, (list, tuple, str, bytes)):
            on_commit = tuple(on_commit)  # a generator of callables: read it once, here
        flat = dict(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every_n_steps=keep_every_n_steps,
            keep_time_interval=keep_time_interval,
            overwrite=overwrite,
            async_save=async_save,
            max_pending=max_pending,
            on_busy=on_busy,
            snapshot=snapshot,
            on_commit=on_commit,
            on_error=on_error,
            verify=verify,
            strict=strict,
            read_only=read_only,
            rank_timeout=rank_timeout,
            writer=writer,
            writer_nice=writer_nice,
            direct_io=direct_io,
            distributed=distributed,
            dir_prefix=dir_prefix,
            mirror=mirror,
            keep_local=keep_local,
            dedup=dedup,
            save_on_preemption=save_on_preemption,
            preemption_signals=preemption_signals,
            preemption_sync_every=preemption_sync_every,
            name_template=name_template,
        )
        groups = dict(
            retention_options=retention_options,
            save_options=save_options,
            io_options=io_options,
            distributed_options=distributed_options,
            restore_options=restore_options,
            mirror_options=mirror_options,
            preemption_options=preemption_options,
        )
        self.options = opts = assemble(options, groups, flat)
        self.policy = policy_of(policy, opts.retention)
        self.directory = os.fspath(directory)
        self.rank, self.world_size = rank_and_world() if opts.distributed.distributed else (0, 1)
        # storage_options (endpoint, credentials) go to fsspec only: never kept, logged or saved.
        self.mirror = open_mirror(self.directory, opts, storage_options, self.world_size)
        self.layout: Layout
        if self.mirror is not None:  # local-first: write and commit locally, upload in the background
            self.storage, self.root, self.layout = self.mirror.local_storage, self.mirror.local_root, self.mirror.layout
        else:
            self.storage, self.root = open_storage(self.directory, storage_options)
            self.layout = Layout(self.storage, self.root, opts.io.dir_prefix, opts.io.name_template)
        if opts.saving.writer == "process" and self.storage.local_path(self.root) is None:
            raise ConfigError(
                f"$writer='process' works with local directories only, not {self.directory}",
                option="writer",
                value="process",
            )
        self.direct_io = opts.io.direct_io and direct_io_enabled()  # also checks CKPT_PLUGINS_DIRECT_IO now
        self._dedup = open_index(opts, self.layout, self.directory) if self.rank == 0 else None
        self._lock = DirectoryLock(self.storage, self.root)
        self._state_lock = threading.Lock()
        try:
            if self.rank == 0 and not opts.io.read_only:
                self.storage.makedirs(self.root)
                self._lock.acquire()
                self.layout.cleanup_leftovers()
                if self.mirror is not None:
                    self.mirror.start()
            # the writer side: stager, engine, writer process, saves in flight (persist/writer.py)
            self._persister = Persister(
                opts.saving,
                storage=self.storage,
                layout=self.layout,
                direct_io=self.direct_io,
                rank=self.rank,
                world_size=self.world_size,
                rank_timeout=opts.distributed.rank_timeout,
                overwrite=opts.retention.overwrite,
                directory=self.directory,
                lock=self._state_lock,
                done=self._save_done,
            )
            # the in-memory tier (ckpt_plugins.memory): None unless memory_tier
            self._memory = open_tier(
                self.memory_options,
                persist_every,
                directory=self.directory,
                rank=self.rank,
                world_size=self.world_size,
                prefix=opts.io.dir_prefix,
                read_only=opts.io.read_only,
            )
        except BaseException:
            if self.mirror is not None:
                self.mirror.close()
            self._lock.release()  # a failure after the lock was taken must not keep it
            raise
        self._mirror_checked = False
        self._snapshot_names: dict[int, str] = {}  # memory tier: step -> the name it persists under
        self._records: dict[int, CheckpointRecord] = {}
        self._restored_step: int | None = None
        self._protected: frozenset[int] = frozenset()  # protect(): steps a framework still points at
        self.last_restore_report: RestoreReport | None = None
        self.last_save_stats: dict[str, float] = {}
        self._closed = False
        self._preemption = PreemptionWatch(opts.preemption, distributed=opts.distributed.distributed)
        exit_hooks.register(self)

    # --- options, as read-only attributes -------------------------------------------------------
    @property
    def monitor(self) -> str | None:
        return self.options.retention.monitor

    @property
    def mode(self) -> str:
        return self.options.retention.mode

    @property
    def async_save(self) -> bool:
        return self.options.saving.async_save

    @property
    def read_only(self) -> bool:
        return self.options.io.read_only

    # --- queries -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending (saves still in flight are not listed)."""
        return [c.step for c in self.layout.committed()]

    def latest_step(self) -> int | None:
        """The newest committed step, damaged or not (a restore finds out); None when there is none.
        To resume, use :attr:`restored_step` after ``restore("latest")``. With ``memory_tier``, the
        newest of the directory and this rank's snapshots that verify."""
        steps = self.steps()
        memory = self._memory.newest() if self._memory is not None else None
        return max([s for s in (steps[-1] if steps else None, memory) if s is not None], default=None)

    @property
    def restored_step(self) -> int | None:
        """The step of the checkpoint the last successful :meth:`restore` loaded (None before one,
        or for a foreign checkpoint without a step). After ``restore("latest")`` skipped a damaged
        newest checkpoint this is the older step, which is where a resume continues from."""
        report = self.last_restore_report
        return None if report is None else report.step

    def best_step(self) -> int | None:
        """The best committed step by ``monitor`` and ``mode``; None without a monitor or metric."""
        if self.monitor is None:
            return None
        return best_step(self.records(), self.monitor, self.mode)

    def records(self) -> list[CheckpointRecord]:
        """Step, commit time and metrics of every committed checkpoint."""
        with self._state_lock:
            committed = self.layout.committed()
            present = {c.step for c in committed}
            for gone in set(self._records) - present:
                del self._records[gone]
            for ckpt in committed:
                if ckpt.step not in self._records:
                    self._records[ckpt.step] = self._record_from_disk(ckpt.step, ckpt.path)
            return [self._records[s] for s in sorted(self._records)]

    def _record_from_disk(self, step: int, path: str) -> CheckpointRecord:
        try:
            manifest = self.layout.read_manifest(path)
        except CorruptCheckpointError as exc:
            log.warning("%s; it counts as the oldest checkpoint with no metrics", exc)
            return CheckpointRecord(step=step, wall_time=0.0)
        return CheckpointRecord(step=step, wall_time=manifest.wall_time, metrics=manifest.metrics)

    def path_for(self, step: int) -> str:
        return self.layout.path_for(step)

    def verify(self, step: int) -> list[str]:
        """Check every file of a committed step (present, size, xxh3); the problems, or []."""
        layout, path = self.layout.copies(step)[0]
        return layout.verify(path)

    def quarantine(self, step: int, reason: str) -> str:
        """Move a damaged committed checkpoint out of the listing, keeping its files for
        inspection (``<name>.damaged-<token>``); return the new path. Rank 0 only."""
        if self.read_only:
            raise ConfigError(f"this CheckpointManager for {self.directory} is read_only; it cannot quarantine")
        path = self.layout.quarantine(step, reason)
        with self._state_lock:
            self._records.pop(step, None)
        return path

    # --- start of a run (ckpt_plugins.layout.run_start) ---------------------------------------
    def start_run(self, step: int = 0, *, resumed: bool = False, hint: str | None = None) -> list[int]:
        """Check, before a run's first save, the checkpoints after ``step`` (where the run starts).

        A fresh run (``resumed=False``) before later checkpoints is refused (unless ``overwrite``);
        a resumed one may save past them: they stay until its first save commits, which replaces
        the one at its step and removes the later ones. One warning names them.

        Args:
            step: the step the run starts at (the resumed step, or 0).
            resumed: the run continues from a checkpoint of ``step``.
            hint: what to do, in the caller's terms, for the error message.

        Returns:
            The later steps, ascending (``[]``: nothing after ``step``).

        Raises:
            StepExistsError: a fresh run before later checkpoints, without ``overwrite``.
        """
        steps = self.steps()
        if self._memory is not None:  # a crashed run's snapshots count: a fresh run must not drop them unasked
            steps = sorted(set(steps) | set(self._memory.tier.steps()))
        later = check_run_start(
            self.directory, steps, step, resumed=resumed, overwrite=self.options.retention.overwrite, hint=hint
        )
        with self._state_lock:
            self._persister.replaceable = frozenset(later)
        return later

    # --- save --------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        *,
        rank_state: Any = None,
        on_commit: Callable[[int, str], None] | None = None,
        user_metadata: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, bytes | Callable[[BinaryIO], None] | TensorFile | StagedFile] | None = None,
        name: str | None = None,
        wait: bool = False,
    ) -> SaveHandle | None:
        """Save ``state`` (nested dicts/lists/tuples of tensors and plain values) as ``step``.

        Returns a handle (already committed unless ``async_save``), or None when the save was
        skipped because ``max_pending`` saves are in flight and ``on_busy="skip"``.

        Raises:
            StepExistsError: a committed checkpoint at this step or a later one exists and
                ``overwrite`` is False.
            UnsupportedStateError: the state holds something that cannot be stored without pickle.
            SaveError: an earlier background save failed (raised once).

        ``extra_files`` maps plain file names to bytes, ``fn(file)`` writers, ``TensorFile`` or
        ``StagedFile`` values (``ckpt_plugins.files.extra_files``: their tensors are staged like the
        state's); they are written on the background writer and committed (and checksummed) with
        the checkpoint. Adapters use them for a framework's native files. Rank 0 only.

        ``name`` commits the checkpoint as ``<directory>/<name>`` instead of ``<dir_prefix><step>``
        (replacing a folder of that name atomically). Named checkpoints are addressed by path, as
        Lightning's CheckpointIO does: they are not listed by ``steps()``, not ordered against
        steps and not touched by retention; remove them with :meth:`delete`. With a
        ``name_template``, the name is made from the template (the first free version: see
        :meth:`name_taken`), and a ``name`` the template could have produced is a step checkpoint
        like the others (listed, ordered, retained).

        ``wait=True`` returns once the checkpoint is committed, even with ``async_save``, and
        raises its error as a synchronous save would. The tensors are then written from where they
        are, without the staging copy (a writer process still stages them): for a save the caller
        would wait for anyway, such as the last one of a run, it saves training one copy of the state.
        """
        self._check_open()
        if self.read_only:
            raise ConfigError(f"this CheckpointManager for {self.directory} is read_only; it cannot save")
        metrics = check_save_arguments(step, metrics, extra_files, name, wait)
        listed = name is None or self.layout.is_listed(name)
        flat, rank_flat, unstorable = flatten_parts(state, rank_state, rank=self.rank, world_size=self.world_size)
        if self._memory is not None and listed:  # a snapshot every save; the disk every K steps
            if name is not None:
                self._snapshot_names[step] = name  # the name it is persisted under (a template's)
            snapshot = self._memory.save(
                step,
                state,
                flat=flat,
                rank_flat=rank_flat,
                unstorable=unstorable,
                extra_files=extra_files,
                metrics=metrics,
                user_metadata=user_metadata,
                retention=policy_flags(self.policy),
                submit=self._submit_snapshot if self.options.saving.snapshot == "overlap" else None,
            )
            if not self._memory.persists(step):
                self.last_save_stats = snapshot.stats
                return snapshot
        return self._persist(
            step, flat, rank_flat, unstorable, extra_files, name, metrics, user_metadata, on_commit, wait=wait
        )

    def prepare(
        self,
        state: Any,
        *,
        rank_state: Any = None,
        extra_files: Mapping[str, bytes | Callable[[BinaryIO], None] | TensorFile | StagedFile] | None = None,
    ) -> bool:
        """Allocate the host memory a save of ``state`` will copy into, in the background, so that
        the first save costs training only its copy (the first touch of fresh memory costs
        several times the copy: page faults and zeroing by the kernel). Reads only the tensors'
        shapes and dtypes; a later save whose tensors differ allocates anew, as always.

        Call it once the state has the tensors it will be saved with (after the first optimizer
        step: optimizers create their state lazily). Local to this rank (no collective). Returns
        False where nothing is staged (``async_save=False``, ``dedup``, a memory tier) or every
        slot is busy.
        """
        self._check_open()
        if self.read_only or not self.async_save or self._dedup is not None or self._memory is not None:
            return False
        flat, rank_flat, unstorable = flatten_parts(state, rank_state, rank=self.rank, world_size=self.world_size)
        if unstorable is not None:
            return False
        return self._persister.prepare(flat, rank_flat, extra_files)

    def _submit_snapshot(self, handle: SaveHandle, job: Callable[[SaveHandle], str]) -> SaveHandle:
        """Overlap mode: the memory snapshot's job runs on the persist engine's writer, in order with
        the saves; :meth:`wait_for_snapshot` waits for it like for any overlapped copy. An earlier
        background snapshot's error is raised here (the next save), as an async save's is."""
        self._persister.engine.take_error(refuse=True)
        self._persister.last_handle = self._persister.engine.submit(handle, job)
        return handle

    def _persist(
        self,
        step: int,
        flat: Any,
        rank_flat: Any,
        unstorable: str | None,
        extra_files: Mapping[str, Any] | None,
        name: str | None,
        metrics: dict[str, float],
        user_metadata: Mapping[str, Any] | None,
        on_commit: Callable[[int, str], None] | None,
        *,
        wait: bool = False,
    ) -> SaveHandle | None:
        """The directory's part of a save: agree (distributed), stage, submit to the writer."""
        if self.mirror is not None and self.world_size > 1 and not self._mirror_checked:
            self.mirror.check_shared(self.rank)  # every rank sees rank 0's local directory
            self._mirror_checked = True
        if name is None and self.layout.template is not None:
            name = self._free_name(step, metrics)
        listed = name is None or self.layout.is_listed(name)
        token, ranks_with_state, ranks_with_shards, name = self._persister.agree(
            step,
            has_rank_state=rank_flat is not None,
            unstorable=unstorable,
            name=name,
            listed=listed,
            shards=shard_summary(flat.shards if flat is not None else {}),
        )
        plan = None
        if self._dedup is not None and listed and flat is not None:
            flat, plan = self._dedup.plan(step, token, flat)  # unchanged tensors: references (docs/dedup.md)
        return self._persister.save(
            step,
            token=token,
            ranks_with_state=ranks_with_state,
            ranks_with_shards=ranks_with_shards,
            flat=flat,
            rank_flat=rank_flat,
            extra_files=extra_files if self.rank == 0 else None,
            name=name,
            listed=listed,
            metrics=metrics,
            user_metadata=user_metadata,
            on_commit=on_commit,
            retention=policy_flags(self.policy) if listed else None,
            on_stats=self._set_save_stats,
            dedup=plan,
            wait=wait,
        )

    def _persist_snapshot(self, step: int, snapshot: Any) -> None:
        """Write a memory snapshot (``memory.tier.Snapshot``) to the directory, and wait for it."""
        flat, rank_flat, unstorable = flatten_parts(
            snapshot.state, snapshot.rank_state, rank=self.rank, world_size=self.world_size
        )
        m = snapshot.manifest
        name = self._snapshot_names.pop(step, None)
        self._persist(step, flat, rank_flat, unstorable, snapshot.extra_files, name, m.metrics, m.user_metadata, None)
        self.wait()

    def name_taken(self, name: str) -> bool:
        """Whether ``name`` exists in the directory or a save to it is in flight (the ``-vN``
        rule: a save in flight does not exist yet, but its name is no longer free)."""
        return self._persister.name_in_flight(name) or self.storage.exists(self.storage.join(self.root, name))

    def _free_name(self, step: int, metrics: Mapping[str, float]) -> str:
        template = self.layout.template
        assert template is not None
        versioned = "version" in template.fields  # without it, a taken name is replaced (atomically)
        version = 0
        while True:
            name = check_folder_name(template.format(step, metrics, version))
            if not versioned or not self.name_taken(name):
                return name
            version += 1

    def _set_save_stats(self, stats: dict[str, float]) -> None:
        self.last_save_stats = stats

    def _save_done(self, request: SaveRequest, manifest: Manifest | None) -> None:
        """A save job finished (the writer's completion callback): forget it as in flight; after a
        commit on rank 0, drop the checkpoints it supersedes (``overwrite``, or an earlier run's
        after a resume: :meth:`start_run`), record it, and apply retention."""
        step = request.step
        if request.dedup is not None and self._dedup is not None:
            self._dedup.finished(request.dedup, manifest)  # before retention: its files stay pinned
        with self._state_lock:
            if request.listed:
                self._persister.in_flight.discard(step)
            if request.name is not None:
                self._persister.in_flight_names[request.name] -= 1
                if self._persister.in_flight_names[request.name] <= 0:
                    del self._persister.in_flight_names[request.name]
            if manifest is None or not request.listed:
                return
            replaceable = self._persister.replaceable
        committed = self.layout.path_for(step, request.name)
        for old in self.layout.committed():
            if old.step > step or (old.step in replaceable and old.step != step):
                log.info(
                    "removing step %d: a checkpoint of an earlier run, superseded by this run's step %d", old.step, step
                )
                self.layout.delete(old.step)
            elif old.step == step and old.path != committed:  # the same step under another name
                log.info("removing %s: replaced by %s (step %d)", old.path, committed, step)
                self.layout.delete_path(old.path)
        with self._state_lock:
            # only now: a save checked meanwhile may pass the ones being removed
            self._persister.replaceable = frozenset()
            self._records[step] = CheckpointRecord(step, manifest.wall_time, manifest.metrics)
            if self._restored_step is not None and step > self._restored_step:
                self._restored_step = None  # a newer checkpoint exists now: no longer protected
        self.prune()

    def wait(self) -> None:
        """Block until every pending save is committed; raise the first error not yet seen."""
        self._persister.wait()

    def wait_for_snapshot(self) -> None:
        """Overlap mode: block until the last save has copied the state (call before
        ``optimizer.step()``). Returns at once in safe mode."""
        self._persister.wait_for_snapshot()

    # --- restore -----------------------------------------------------------------------------
    def restore(
        self,
        which: Which = "latest",
        *,
        target: Any = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        rename: Mapping[str, str] | None = None,
        strict: bool | None = None,
        map_location: str | torch.device = "cpu",
        allow_unsafe_pickle: bool = False,
    ) -> Any:
        """Load a checkpoint: ``"latest"``, ``"best"``, a step, or a path (ours or foreign).

        ``"latest"`` (and ``"best"``) skip damaged checkpoints with a warning that names the file;
        an explicit step or path raises instead. ``include``/``exclude`` are glob patterns on key
        paths (``model.*``), ``rename`` maps prefixes, ``target`` is loaded in place (tensors,
        dicts, lists, modules, optimizers) with shape/dtype checks; keys of the checkpoint that
        no target names are returned but never fail a strict restore. The report is kept in
        ``last_restore_report``, and the step that was loaded in :attr:`restored_step`: resume
        from that, not from ``latest_step()``, which may be a damaged checkpoint that was skipped.

        Example:
            >>> mgr.restore("latest", target={"model": model, "optimizer": opt})  # doctest: +SKIP
            >>> start = mgr.restored_step + 1  # doctest: +SKIP

        Raises:
            CheckpointNotFoundError: nothing matches ``which``.
            CorruptCheckpointError: an explicit checkpoint failed verification.
            RestoreError: ``strict`` and a target key is missing or differs in shape or dtype.
            ConfigError: an option has the wrong type, or an ``include``/``exclude`` pattern or
                a ``rename`` prefix matches nothing (the message lists the top-level keys).
        """
        self._check_open()
        selector = make_selector(include, exclude)
        strict = self.options.restore.strict if strict is None else strict
        check_rename(rename)
        check_strict(strict)
        self._persister.engine.flush()
        from ckpt_plugins.restore.read import restore_ours, restore_which

        memory = self._memory_path(which)
        if memory is not None:  # the in-memory tier: the same reader on the snapshot's storage
            tier = self._memory.tier  # type: ignore[union-attr]
            try:
                state, report = restore_ours(
                    tier.storage,
                    tier.layout,
                    memory,
                    verify=self.options.restore.verify and memory not in tier.verified,  # checked just now
                    target=target,
                    selector=selector,
                    rename=rename,
                    strict=strict,
                    map_location=map_location,
                    allow_unsafe_pickle=allow_unsafe_pickle,
                )
            except CorruptCheckpointError as exc:  # found while reading: skip it, choose again
                tier.mark_damaged(memory, str(exc))
                return self.restore(
                    which,
                    target=target,
                    include=include,
                    exclude=exclude,
                    rename=rename,
                    strict=strict,
                    map_location=map_location,
                    allow_unsafe_pickle=allow_unsafe_pickle,
                )
            log.info("restored from memory: %s", report.summary())
            self.last_restore_report = report
            self._restored_step = report.step
            return state
        ranked = partial(candidates, steps=self.steps, records=self.records, monitor=self.monitor, mode=self.mode)
        state, report, step = restore_which(
            self.storage,
            self.layout,
            which,
            candidates=ranked,
            directory=self.directory,
            verify=self.options.restore.verify,
            target=target,
            selector=selector,
            rename=rename,
            strict=strict,
            map_location=map_location,
            allow_unsafe_pickle=allow_unsafe_pickle,
        )
        self.last_restore_report = report
        if step is not None:
            self._restored_step = step
        return state

    def memory_snapshot(self, step: int | None = None) -> tuple[int, str] | None:
        """``(step, path)`` of this rank's in-memory snapshot of ``step`` (default: the newest that
        verifies), or None (none, or no ``memory_tier``). No collective: adapters use it to point
        a framework's loader at a snapshot, and read it through :meth:`restore`."""
        if self._memory is None:
            return None
        step = self._memory.newest() if step is None else step
        path = None if step is None else self._memory.path_if_held(step)
        return None if step is None or path is None else (step, path)

    def is_memory_snapshot(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` lies in this directory's in-memory snapshots (any rank's)."""
        if self._memory is None:
            return False
        base = os.path.realpath(self._memory.tier.base)
        return os.path.realpath(os.fspath(path)).startswith(base + os.sep)

    def _memory_path(self, which: Which) -> str | None:
        """The snapshot a restore of ``which`` reads (``"latest"``: agreed across the ranks, not
        older than the directory's newest; a step: this rank's snapshot of it), or None."""
        if self._memory is None:
            return None
        if isinstance(which, str) and which == "latest":
            steps = self.steps()
            step = self._memory.agree(steps[-1] if steps else None)
            return None if step is None else self._memory.tier.path_for(step)
        if isinstance(which, int) and not isinstance(which, bool):
            return self._memory.path_if_held(which)
        return None

    def restore_rank_state(
        self, which: Which = "latest", rank: int | None = None, map_location: str | torch.device = "cpu"
    ) -> Any:
        """The per-rank state (``save(..., rank_state=...)``) of ``rank`` (default: this rank);
        None when that checkpoint has none for it."""
        step = self.latest_step() if which == "latest" else (self.best_step() if which == "best" else which)
        if not isinstance(step, int):
            raise CheckpointNotFoundError(f"no checkpoint {which!r} in {self.directory}")
        from ckpt_plugins.restore.read import read_rank_state

        memory = self._memory.path_if_held(step) if self._memory is not None and rank in (None, self.rank) else None
        if memory is not None:  # a snapshot holds this rank's state as its part rank_0
            tier = self._memory.tier  # type: ignore[union-attr]
            return read_rank_state(
                tier.storage, tier.layout, memory, 0, verify=self.options.restore.verify, map_location=map_location
            )
        layout, path = self.layout.copies(step)[0]
        return read_rank_state(
            layout.storage,
            layout,
            path,
            self.rank if rank is None else rank,
            verify=self.options.restore.verify,
            map_location=map_location,
        )

    def delete(self, which: int | str) -> SaveHandle:
        """Remove a checkpoint by step or by name, after every save submitted before this call
        (queued on the writer, so a delete never overtakes a save). Rank 0 does the work."""
        self._check_open()
        if self.read_only:
            raise ConfigError(f"this CheckpointManager for {self.directory} is read_only; it cannot delete")
        if isinstance(which, str):
            check_folder_name(which)
        path = self.layout.path_for(which) if isinstance(which, int) else self.storage.join(self.root, which)
        return self._persister.delete(which if isinstance(which, int) else -1, path)

    def protect(self, steps: Iterable[int]) -> None:
        """Name the steps retention must keep besides its own rules, replacing the previous set:
        checkpoints the framework still refers to, such as the HF Trainer's ``best_global_step``
        (its ``best_model_checkpoint``) when the metric that made it best never reached us."""
        wanted = list(steps)
        for step in wanted:
            check_step("protect() step", step)
        with self._state_lock:
            self._protected = frozenset(wanted)

    def retention(self) -> RetentionDecision:
        """What the retention policy keeps (with reasons) and deletes, for the committed steps: besides
        its rules, the step last restored (until a newer one commits) and the :meth:`protect` steps."""
        with self._state_lock:
            protected = self._protected | ({self._restored_step} if self._restored_step is not None else set())
        return self.policy.decide(self.records(), RetentionContext(now=time.time(), protected_steps=protected))

    def prune(self, dry_run: bool = False) -> RetentionDecision:
        """Apply the retention policy now (saves do this after each commit); rank 0 only."""
        decision = self.retention()
        if dry_run or self.rank != 0:
            return decision
        if self.read_only:
            raise ConfigError(f"this CheckpointManager for {self.directory} is read_only; it cannot prune")
        for step in decision.delete:
            log.info("retention removes step %d", step)
            self.layout.delete(step)
        return decision

    # --- preemption (ckpt_plugins.persist.preemption) ------------------------------------------
    def preemption_requested(self, step: int | None = None) -> bool:
        """Call at every step boundary, on every rank: True once a preemption signal arrived
        (``preemption_signals``) and all ranks agree to stop here; then save this step,
        :meth:`wait`, and leave the loop. The first call installs the signal handlers; from then
        on a signal only sets a flag. At exit the process ends with that signal (status 143 for
        SIGTERM). Under ``torch.distributed`` every ``preemption_sync_every``-th call is one
        all_reduce of one element. Always False with ``save_on_preemption=False``.

        Example:
            >>> for step in range(start, steps):  # doctest: +SKIP
            ...     train_step()
            ...     if mgr.preemption_requested(step):
            ...         mgr.save(step, state)
            ...         mgr.wait()
            ...         break
        """
        return self._preemption.requested(step)

    def watch_preemption(self, chain: Iterable[int] = ()) -> None:
        """Install the preemption handlers now (adapters, at the start of training), not at the
        first :meth:`preemption_requested`; ``chain``: signals whose previous handler runs too."""
        self._preemption.start(chain)

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Flush pending saves, stop the writer, release the lock. Raises a pending save error."""
        if self._closed:
            return
        self._preemption.stop()
        try:
            try:
                if self._memory is not None:
                    self._memory.finish(self)  # persist a newer snapshot, then free the memory
            finally:
                self._persister.close()
        finally:
            self._closed = True
            try:
                if self.mirror is not None:
                    self.mirror.close()  # uploads what the saves committed, releases the remote lock
            finally:
                self._lock.release()
            exit_hooks.unregister(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this CheckpointManager for {self.directory} is closed")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original exception behind a save error
            try:
                self.close()
            except Exception as close_exc:
                log.error("while closing after an error: %s", close_exc)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, policy={self.policy}, async_save={self.async_save})"
