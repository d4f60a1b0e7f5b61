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
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch

from ckpt_plugins.persist import exit_hooks
from ckpt_plugins.distributed import all_gather_object, rank_and_world
from ckpt_plugins.persist.engine import PersistEngine, SaveHandle
from ckpt_plugins.persist.save_job import SaveJob
from ckpt_plugins.files.extra_files import collect_tensors
from ckpt_plugins.errors import (CheckpointNotFoundError, ConfigError, CorruptCheckpointError, DistributedError,
                     SaveError, StepExistsError, UnsupportedStateError, WriterError)
from ckpt_plugins.layout.commit import Layout, check_folder_name
from ckpt_plugins.layout.lock import DirectoryLock
from ckpt_plugins.layout.run_start import check_run_start
from ckpt_plugins.files.manifest import _SAFE_NAME, MANIFEST_NAME
from ckpt_plugins.restore.choose import first_usable
from ckpt_plugins.restore.select import check_rename, check_strict, make_selector
from ckpt_plugins.restore.targets import RestoreReport
from ckpt_plugins.retention.policy import (CheckpointRecord, RetentionContext, RetentionDecision, RetentionPolicy,
                                          best_step)
from ckpt_plugins.options import (DistributedOptions, IOOptions, ManagerOptions, RestoreOptions, RetentionOptions,
                                  SaveOptions)
from ckpt_plugins.options.checks import check_directory
from ckpt_plugins.options.model import assemble
from ckpt_plugins.storage.direct_io import direct_io_enabled
from ckpt_plugins.persist.stager import HostStager
from ckpt_plugins.persist.writer_process import ProcessWriter
from ckpt_plugins.tree.codec import flatten_state
from ckpt_plugins.storage import open_storage
from ckpt_plugins.files.tensor_file import FileRecord, write_tensor_file

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)

Which = Literal["latest", "best"] | int | str | os.PathLike


class CheckpointManager:
    """Crash-safe checkpoints in one directory, with retention, async saving and restore.

    Args:
        directory: a local path or an fsspec URL (``memory://run1``, ``s3://bucket/run1``).
        keep_last: keep the N most recent checkpoints.
        keep_best: keep the N best by ``monitor`` (needs ``monitor``).
        monitor: metric name used by ``keep_best`` and ``restore("best")``.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        keep_every_n_steps: keep steps divisible by N for good.
        keep_time_interval: keep the first checkpoint of each interval (seconds or timedelta).
        overwrite: allow saving at or before an existing step (later checkpoints are removed).
        async_save: return from ``save`` once the state is copied; persist in the background.
        max_pending: at most this many saves in flight (and staged copies in memory).
        on_busy: when ``max_pending`` saves are in flight: ``"wait"`` blocks, ``"skip"`` skips.
        snapshot: ``"safe"`` copies inside ``save``; ``"overlap"`` copies in the background and
            requires :meth:`wait_for_snapshot` before the next ``optimizer.step()``.
        on_commit: callables ``fn(step, path)`` run after every commit.
        on_error: ``"raise"`` surfaces a failed background save at the next call; ``"warn"`` logs
            it and keeps training.
        verify: check file checksums when restoring.
        read_only: only list and restore (no lock, no cleanup, ``save`` refused); for evaluation
            jobs and tools that read a directory another process is writing.
        rank_timeout: seconds rank 0 waits for other ranks' files before failing the save.
        writer: ``"thread"`` writes tensor files on the background thread; ``"process"`` hands
            staged shared-memory buffers to a writer process (no GIL contention with training;
            needs ``async_save=True`` and a local directory).
        writer_nice: lower the background writer thread's scheduling priority by this much (Linux
            nice increment; default 0). Measured on 2 cores: less slowdown of training while a
            persist runs, but a longer persist and more training time lost in total.
        direct_io: write tensor files with ``O_DIRECT`` (past the page cache: one memory copy
            instead of the page cache's copy and writeback) where the file system supports it,
            plain writes elsewhere. ``False``, or ``CKPT_PLUGINS_DIRECT_IO=0`` in the environment,
            always writes through the page cache.
        distributed: under torch.distributed, act as one of the ranks (the default). ``False``
            makes this manager a world of one even in a distributed job: no collectives, rank 0
            duties (lock, commit, retention) in this process. For code that already saves on
            one rank only, such as Lightning's CheckpointIO.
        dir_prefix: checkpoint folder names are ``<dir_prefix><step>`` (``checkpoint-`` gives the
            HF Trainer's layout).
        strict: the default of ``restore(strict=...)``.
        options: every option at once, as a :class:`~ckpt_plugins.options.ManagerOptions`
            (instead of the keywords above).
        retention_options, save_options, io_options, distributed_options, restore_options: one
            group of options as an object (:mod:`ckpt_plugins.options`) instead of its keywords.
        policy: a ready :class:`~ckpt_plugins.retention.RetentionPolicy` instead of the
            ``keep_*`` keywords (``monitor``/``mode`` still rank for ``best_step``).

    Every option is checked here, before the directory is touched: a bad value is a
    :class:`~ckpt_plugins.errors.ConfigError` naming it (``exc.option``), with the value and the fix.
    See docs/options.md.

    Example:
        >>> with CheckpointManager("runs/demo", keep_last=3) as mgr:  # doctest: +SKIP
        ...     mgr.save(100, {"model": model.state_dict()}, metrics={"loss": 0.3})
        ...     state = mgr.restore("latest")
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int | None = None,
                 keep_best: int | None = None, monitor: str | None = None, mode: Literal["min", "max"] = "min",
                 keep_every_n_steps: int | None = None,
                 keep_time_interval: float | timedelta | None = None, overwrite: bool = False,
                 async_save: bool = False, max_pending: int = 1,
                 on_busy: Literal["wait", "skip"] = "wait",
                 snapshot: Literal["safe", "overlap"] = "safe",
                 on_commit: Callable[[int, str], None] | Iterable[Callable[[int, str], None]] | None = None,
                 on_error: Literal["raise", "warn"] = "raise", verify: bool = True,
                 read_only: bool = False, rank_timeout: float = 600.0,
                 writer: Literal["thread", "process"] = "thread", writer_nice: int = 0,
                 direct_io: bool = True, distributed: bool = True,
                 dir_prefix: str = "step_", strict: bool = True,
                 options: ManagerOptions | None = None, retention_options: RetentionOptions | None = None,
                 save_options: SaveOptions | None = None, io_options: IOOptions | None = None,
                 distributed_options: DistributedOptions | None = None,
                 restore_options: RestoreOptions | None = None, policy: RetentionPolicy | None = None) -> None:
        check_directory("directory", directory)
        if isinstance(on_commit, Iterable) and not isinstance(on_commit, (list, tuple, str, bytes)):
            on_commit = tuple(on_commit)  # a generator of callables: read it once, here
        flat = dict(keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode,
                    keep_every_n_steps=keep_every_n_steps, keep_time_interval=keep_time_interval,
                    overwrite=overwrite, async_save=async_save, max_pending=max_pending, on_busy=on_busy,
                    snapshot=snapshot, on_commit=on_commit, on_error=on_error, verify=verify, strict=strict,
                    read_only=read_only, rank_timeout=rank_timeout, writer=writer, writer_nice=writer_nice,
                    direct_io=direct_io, distributed=distributed, dir_prefix=dir_prefix)
        groups = dict(retention_options=retention_options, save_options=save_options, io_options=io_options,
                      distributed_options=distributed_options, restore_options=restore_options)
        self.options = opts = assemble(options, groups, flat)
        self.policy = _policy(policy, opts.retention)
        self.directory = os.fspath(directory)
        self.rank, self.world_size = rank_and_world() if opts.distributed.distributed else (0, 1)
        self.storage, self.root = open_storage(self.directory)
        if opts.saving.writer == "process" and self.storage.local_path(self.root) is None:
            raise ConfigError(f"$writer='process' works with local directories only, not {self.directory}",
                              option="writer", value="process")
        self.direct_io = opts.io.direct_io and direct_io_enabled()  # also checks CKPT_PLUGINS_DIRECT_IO now
        self.layout = Layout(self.storage, self.root, opts.io.dir_prefix)
        self._lock = DirectoryLock(self.storage, self.root)
        try:
            if self.rank == 0 and not opts.io.read_only:
                self.storage.makedirs(self.root)
                self._lock.acquire()
                self.layout.cleanup_leftovers()
            self._stager = HostStager(opts.saving.max_pending, shared=opts.saving.writer == "process")
            self._process_writer = ProcessWriter(self.direct_io, self._stager) \
                if opts.saving.writer == "process" else None
            self._engine = PersistEngine(async_save=opts.saving.async_save, writer_nice=opts.saving.writer_nice)
        except BaseException:
            self._lock.release()  # a failure after the lock was taken must not keep it
            raise
        self._records: dict[int, CheckpointRecord] = {}
        self._state_lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._restored_step: int | None = None
        self._replaceable: frozenset[int] = frozenset()  # start_run: an earlier run's later steps
        self._last_handle: SaveHandle | None = None
        self.last_restore_report: RestoreReport | None = None
        self.last_save_stats: dict[str, float] = {}
        self._closed = False
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
        To resume, use :attr:`restored_step` after ``restore("latest")``."""
        steps = self.steps()
        return steps[-1] if steps else None

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
        return self.layout.verify(self.layout.path_for(step))

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
        later = check_run_start(self.directory, self.steps(), step, resumed=resumed, overwrite=self.options.retention.overwrite,
                                hint=hint)
        with self._state_lock:
            self._replaceable = frozenset(later)
        return later

    # --- save --------------------------------------------------------------------------------
    def save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None, *,
             rank_state: Any = None, on_commit: Callable[[int, str], None] | None = None,
             user_metadata: Mapping[str, Any] | None = None,
             extra_files: Mapping[str, bytes | Callable[[Any], None]] | None = None,
             name: str | None = None) -> SaveHandle | None:
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
        steps and not touched by retention; remove them with :meth:`delete`.
        """
        self._check_open()
        if self.read_only:
            raise ConfigError(f"this CheckpointManager for {self.directory} is read_only; it cannot save")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a non-negative integer, got {step!r}")
        clean_metrics = _clean_metrics(metrics)
        for file_name in extra_files or {}:
            if not isinstance(file_name, str) or not _SAFE_NAME.match(file_name) or ".." in file_name \
                    or file_name == MANIFEST_NAME or file_name.endswith(".safetensors") \
                    and file_name.startswith(("state", "rank_")):
                raise ConfigError(f"extra_files name {file_name!r} is not a plain file name, or is reserved "
                                  "(manifest.json, state*.safetensors, rank_*.safetensors)")
        if name is not None:
            check_folder_name(name)
        flat = rank_flat = flatten_error = None
        try:
            flat = flatten_state(state) if self.rank == 0 else None
            rank_flat = flatten_state(rank_state) if rank_state is not None else None
        except UnsupportedStateError as exc:
            if self.world_size == 1:
                raise
            flatten_error = str(exc)  # every rank must hear of it, or the others would hang
        token, ranks_with_state = self._agree(step, has_rank_state=rank_state is not None,
                                              flatten_error=flatten_error, name=name)
        slot = self._stager.acquire(block=self.options.saving.on_busy == "wait")
        if slot is None:
            log.warning("skipping the save of step %d: %d save(s) still in flight (on_busy='skip')",
                        step, self._stager.slots)
            return None
        t0 = time.perf_counter()
        tensors = {}
        if flat is not None:
            tensors.update({f"state/{k}": v for k, v in flat.tensors.items()})
        if rank_flat is not None:
            tensors.update({f"rank/{k}": v for k, v in rank_flat.tensors.items()})
        extra_tensors, extra_specs = collect_tensors((extra_files or {}) if self.rank == 0 else {})
        tensors.update(extra_tensors)
        handle = SaveHandle(step, self.layout.path_for(step, name))
        staged = None
        try:
            if self.options.saving.snapshot == "safe" and (self.async_save or any(t.is_cuda for t in tensors.values())):
                staged = self._stager.stage(slot, tensors)
                staged.wait()
        except BaseException:
            self._stager.release(slot)
            raise
        handle.stats.update(step=step, bytes=float(sum(t.numel() * t.element_size() for t in tensors.values())))
        self.last_save_stats = handle.stats
        if name is None:
            with self._state_lock:
                self._in_flight.add(step)
        job = SaveJob(self, step, token, ranks_with_state, flat, rank_flat, tensors, staged, slot,
                      clean_metrics, dict(user_metadata or {}), on_commit, extra_specs, name)
        handle.stats["stall_s"] = time.perf_counter() - t0
        try:
            self._last_handle = self._engine.submit(handle, job)
        except BaseException:
            self._stager.release(slot)
            with self._state_lock:
                self._in_flight.discard(step)
            raise
        handle.stats["stall_s"] = time.perf_counter() - t0
        if not self.async_save:
            self._report(handle)
            if self.world_size > 1:
                self.wait()  # a synchronous save returns on every rank once rank 0 has committed
        return handle

    def _agree(self, step: int, *, has_rank_state: bool, flatten_error: str | None = None,
               name: str | None = None) -> tuple[str, list[int]]:
        """Check the step against what exists, and (distributed) that every rank agrees."""
        own_error = self._take_error(refuse=True)
        conflict = self._order_conflict(step) if self.rank == 0 and name is None else None
        token = uuid.uuid4().hex[:12]
        views = self._gather((step, own_error, conflict, token, has_rank_state, flatten_error))
        errors = [f"rank {r}: {v[1]}" for r, v in enumerate(views) if v[1]]
        if errors:
            raise SaveError("an earlier save failed; " + "; ".join(errors))
        unstorable = [f"rank {r}: {v[5]}" for r, v in enumerate(views) if v[5]]
        if unstorable:
            raise UnsupportedStateError("; ".join(unstorable))
        steps = {v[0] for v in views}
        if len(steps) > 1:
            raise DistributedError("ranks called save() with different steps: " +
                                   ", ".join(f"rank {r}: {v[0]}" for r, v in enumerate(views)) +
                                   "; every rank must save the same step")
        if views[0][2]:
            raise StepExistsError(views[0][2])
        return views[0][3], [r for r, v in enumerate(views) if v[4]]

    def _gather(self, obj: Any) -> list[Any]:
        return all_gather_object(obj) if self.world_size > 1 else [obj]

    def _order_conflict(self, step: int) -> str | None:
        with self._state_lock:
            later = sorted({s for s in self.steps() if s >= step and s not in self._replaceable}
                           | {s for s in self._in_flight if s >= step})
        if later and not self.options.retention.overwrite:
            return (f"cannot save step {step} in {self.directory}: checkpoint(s) at step(s) {later} "
                    "already exist or are being saved, at or after it. Use a larger step, or "
                    "overwrite=True to replace them (later checkpoints are then removed).")
        return None

    def _write_tensors(self, path: str, tensors: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, str] | None = None, slot: int | None = None) -> FileRecord:
        if self._process_writer is not None:
            return self._process_writer.write(path, tensors, metadata, slot)
        return write_tensor_file(self.storage, path, tensors, metadata, direct_io=self.direct_io)

    def wait(self) -> None:
        """Block until every pending save is committed; raise the first error not yet seen."""
        self._engine.flush()
        own_error = self._take_error()
        errors = [f"rank {r}: {e}" for r, e in enumerate(self._gather(own_error)) if e]
        if errors:
            raise SaveError("a save failed; " + "; ".join(errors))

    def wait_for_snapshot(self) -> None:
        """Overlap mode: block until the last save has copied the state (call before
        ``optimizer.step()``). Returns at once in safe mode."""
        if self._last_handle is not None and not self._last_handle._staged.done():
            try:
                self._last_handle.wait_staged()
            except BaseException:  # noqa: BLE001 - the error surfaces through wait()/save()
                pass

    def _take_error(self, refuse: bool = False) -> str | None:
        """Raise (one process) or return (for the other ranks to hear of it) an unseen save error;
        when ``refuse`` (a new save), also a failed writer's error, whatever ``on_error`` says."""
        try:
            self._engine.raise_pending_error(refuse=refuse)
        except WriterError as exc:
            if self.world_size == 1:
                raise
            return str(exc)
        except SaveError as exc:
            if self.options.saving.on_error == "warn":
                log.warning("a checkpoint save failed and on_error='warn': %s", exc)
                return None
            if self.world_size == 1:
                raise
            return str(exc)
        return None

    def _report(self, handle: SaveHandle) -> None:
        try:
            handle.wait()
        except Exception as exc:
            if self.options.saving.on_error == "warn":
                log.warning("saving step %d failed and on_error='warn': %s", handle.step, exc)
            elif self.world_size == 1:
                raise

    # --- restore -----------------------------------------------------------------------------
    def restore(self, which: Which = "latest", *, target: Any = None,
                include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
                rename: Mapping[str, str] | None = None, strict: bool | None = None,
                map_location: str | torch.device = "cpu", allow_unsafe_pickle: bool = False) -> Any:
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
        self._engine.flush()
        options = dict(target=target, selector=selector, rename=rename, strict=strict,
                       map_location=map_location, allow_unsafe_pickle=allow_unsafe_pickle)
        if isinstance(which, str) and which in ("latest", "best"):
            return first_usable(self._candidates(which),
                                lambda step: self._restore_dir(self.layout.path_for(step), step=step, **options),
                                what=which, directory=self.directory)
        if isinstance(which, int) and not isinstance(which, bool):
            path = self.layout.path_for(which)
            if not self.storage.exists(self.storage.join(path, MANIFEST_NAME)):
                raise CheckpointNotFoundError(
                    f"no committed checkpoint for step {which} in {self.directory}; "
                    f"available steps: {self.steps()}")
            return self._restore_dir(path, step=which, **options)
        if isinstance(which, (str, os.PathLike)):
            from ckpt_plugins.restore.read import restore_path
            state, report = restore_path(os.fspath(which), **options, verify=self.options.restore.verify)
            self.last_restore_report = report
            return state
        raise ConfigError(f"restore() takes 'latest', 'best', a step (int) or a path, got {which!r}")

    def _candidates(self, which: str) -> list[int]:
        if which == "latest":
            return self.steps()[::-1]
        if self.monitor is None:
            raise ConfigError("restore('best') needs monitor= (and mode=) on the CheckpointManager")
        records = self.records()
        ranked = []
        while True:
            best = best_step([r for r in records if r.step not in ranked], self.monitor, self.mode)
            if best is None:
                return ranked
            ranked.append(best)

    def _restore_dir(self, path: str, *, step: int, **options: Any) -> Any:
        from ckpt_plugins.restore.read import restore_ours
        state, report = restore_ours(self.storage, self.layout, path, verify=self.options.restore.verify, **options)
        report.step = step
        self.last_restore_report = report
        self._restored_step = step
        log.info(report.summary())
        return state

    def restore_rank_state(self, which: Which = "latest", rank: int | None = None,
                           map_location: str | torch.device = "cpu") -> Any:
        """The per-rank state (``save(..., rank_state=...)``) of ``rank`` (default: this rank);
        None when that checkpoint has none for it."""
        step = self.latest_step() if which == "latest" else (self.best_step() if which == "best" else which)
        if not isinstance(step, int):
            raise CheckpointNotFoundError(f"no checkpoint {which!r} in {self.directory}")
        from ckpt_plugins.restore.read import restore_ours
        state, _ = restore_ours(self.storage, self.layout, self.layout.path_for(step), verify=self.options.restore.verify,
                                part=f"rank_{self.rank if rank is None else rank}", target=None,
                                selector=None, rename=None, strict=True, map_location=map_location,
                                allow_unsafe_pickle=False, missing_ok=True)
        return state

    def delete(self, which: int | str) -> SaveHandle:
        """Remove a checkpoint by step or by name, after every save submitted before this call
        (queued on the writer, so a delete never overtakes a save). Rank 0 does the work."""
        self._check_open()
        if self.read_only:
            raise ConfigError(f"this CheckpointManager for {self.directory} is read_only; it cannot delete")
        if isinstance(which, str):
            check_folder_name(which)
        path = self.layout.path_for(which) if isinstance(which, int) else self.storage.join(self.root, which)
        handle = SaveHandle(which if isinstance(which, int) else -1, path)

        def job(h: SaveHandle) -> str:
            h._staged.set_result(None)
            if self.rank == 0:
                self.layout.delete_path(path)
            return path

        self._engine.submit(handle, job)
        if not self.async_save:
            self._report(handle)
        return handle

    def retention(self) -> RetentionDecision:
        """What the retention policy keeps (with reasons) and deletes, for the committed steps."""
        with self._state_lock:
            protected = frozenset({self._restored_step} if self._restored_step is not None else ())
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

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Flush pending saves, stop the writer, release the lock. Raises a pending save error."""
        if self._closed:
            return
        try:
            self._engine.shutdown()
            if self._process_writer is not None:
                self._process_writer.close()
            self._take_error()
        finally:
            self._closed = True
            self._lock.release()
            exit_hooks.unregister(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this CheckpointManager for {self.directory} is closed")

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original exception behind a save error
            try:
                self.close()
            except Exception as close_exc:  # noqa: BLE001
                log.error("while closing after an error: %s", close_exc)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, policy={self.policy}, async_save={self.async_save})"


def _policy(policy: Any, retention: RetentionOptions) -> RetentionPolicy:
    """A ready ``policy`` (then no ``keep_*`` option may be set), else the one ``retention`` stands for."""
    if policy is None:
        return retention.policy()
    if not isinstance(policy, RetentionPolicy):
        raise ConfigError(f"$policy must be a RetentionPolicy (ckpt_plugins.retention), got {policy!r}",
                          option="policy", value=policy)
    if retention.has_rules:
        rules = [f"{n}={getattr(retention, n)!r}" for n in ("keep_last", "keep_best", "keep_every_n_steps",
                                                           "keep_time_interval") if getattr(retention, n) is not None]
        raise ConfigError(f"$policy replaces the keep_* rules, and {', '.join(rules)} is set too; put that rule "
                          "in the policy or drop policy=", option="policy", value=policy)
    return policy


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigError(f"metric {name!r} is a tensor with {value.numel()} elements; pass a scalar")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy scalars and similar
            except (TypeError, ValueError):
                raise ConfigError(f"metric {name!r} must be a number, got {value!r}") from None
        out[str(name)] = float(value) if not isinstance(value, float) else value
        if math.isnan(out[str(name)]):
            log.debug("metric %r is NaN at this save; it ranks worst", name)
    return out
