"""``CheckpointCallback``: a drop-in for Lightning's ``ModelCheckpoint``, backed by the core.

The callback decides *when* to save (Lightning's triggers, :mod:`.triggers`) and *what* a save
holds: Lightning's checkpoint dict (:mod:`.state`) as the shared state, and on every rank that
rank's RNG state and data position (:mod:`.rng`, :mod:`.data_position`) as its ``rank_state``.
The core's :class:`~ckpt_plugins.CheckpointManager` does the rest: staging, background writing,
atomic commit, checksums, retention (``keep_last``, ``keep_best``, ...), multi-rank commit.

It subclasses ``ModelCheckpoint`` so Lightning treats it as one: ``trainer.checkpoint_callback``
finds it, ``ckpt_path="last"``/``"best"`` resolve to its folders, ``best_model_path``,
``best_model_score`` and ``last_model_path`` are set (from the committed checkpoints). It
overrides every hook ``ModelCheckpoint`` implements; nothing of ``ModelCheckpoint``'s saving
logic runs. The trainer's ``CheckpointIO`` is left as the user configured it, so
``trainer.save_checkpoint(path)`` behaves as without the callback; loading our folders through
Lightning's default IO (and ``load_from_checkpoint``) works through :mod:`.load_hook`.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from typing import Any, Literal
from weakref import proxy

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from ckpt_plugins.activation import (
    ActivationCheckpointing,
    ActivationCheckpointingWarning,
    apply_activation_checkpointing,
)
from ckpt_plugins.errors import UnsupportedStateError
from ckpt_plugins.lightning import load_hook, model_parallel, preemption
from ckpt_plugins.lightning.data_position import DataPosition
from ckpt_plugins.lightning.naming import build_checkpoint, checkpoint_name_template
from ckpt_plugins.lightning.paths import CommittedPaths
from ckpt_plugins.lightning.reader import register_manager, unregister_manager
from ckpt_plugins.lightning.state import RANK_STATE_KEY, explain_unsupported, to_storable
from ckpt_plugins.lightning.stats import SaveStats
from ckpt_plugins.lightning.triggers import Triggers, validation_follows
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.options import ManagerOptions
from ckpt_plugins.options.checks import check_storage_options
from ckpt_plugins.options.memory_steps import memory_kwargs
from ckpt_plugins.rng import capture_rng, restore_rng

__all__ = ["CheckpointCallback"]

log = logging.getLogger(__name__)

load_hook.install()


class CheckpointCallback(CommittedPaths, ModelCheckpoint):
    """Crash-safe, asynchronous, retention-aware checkpoints with exact resume for Lightning.

    Checkpoints are folders named as ``ModelCheckpoint`` names its files
    (``<dirpath>/epoch=0-step=5.ckpt/``; ``filename=`` templates, ``-vN`` when a name is taken,
    ``last.ckpt`` with ``save_last``). Resume with ``trainer.fit(model, ckpt_path="last")`` (or
    ``"best"``, or a folder path).

    Args:
        dirpath: where checkpoints go; default as ``ModelCheckpoint``: ``<logger dir>/checkpoints``
            or ``<default_root_dir>/checkpoints``. Pass it to resume with ``ckpt_path="last"``
            from a new process.
        filename: ``ModelCheckpoint``'s name template (``"{epoch}-{step}"``, the default;
            ``"{epoch:02d}-{val_loss:.2f}"``), formatted by ``ModelCheckpoint`` itself, with
            ``auto_insert_metric_name``, ``CHECKPOINT_EQUALS_CHAR`` and ``FILE_EXTENSION``.
        auto_insert_metric_name: as ``ModelCheckpoint`` (``{epoch}`` becomes ``epoch=0``).
        enable_version_counter: a name that is taken (on disk or by a save in flight) gets
            ``-v1``, ``-v2``, ...; ``False``: the new checkpoint replaces it.
        save_last: also keep a copy of the latest checkpoint as ``last.ckpt``
            (``CHECKPOINT_NAME_LAST``); ``"link"`` is taken as ``True`` (a copy, not a link).
        keep_last: keep the N most recent checkpoints.
        keep_best: keep the N best by ``monitor`` (needs ``monitor``).
        monitor: metric (as logged with ``self.log``) that ranks checkpoints.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        keep_every_n_steps: keep steps divisible by N for good.
        keep_time_interval: keep the first checkpoint of each interval (seconds or timedelta).
            Without any ``keep_*`` option every checkpoint is kept.
        overwrite: allow saving at or before an existing step (e.g. after resuming from an older
            checkpoint; the later ones are removed).
        async_save: return once the state is copied; write and commit in the background.
        max_pending: saves in flight at once; a further save waits for one to finish.
        snapshot: ``"safe"`` copies the state inside the save; ``"overlap"`` copies it in the
            background while the next forward/backward runs, and waits for the copy before the
            next optimizer step (needs ``async_save``).
        writer: ``"thread"`` (default) or ``"process"``: tensor files written by a separate
            process from shared-memory copies, so the writer does not compete with training for
            the GIL (needs ``async_save`` and a local ``dirpath``).
        every_n_train_steps: save every N optimizer steps.
        every_n_epochs: save every N epochs (the default, N=1, when no trigger is set).
        train_time_interval: save when this much time passed (seconds or timedelta).
        save_on_train_epoch_end: epoch saves at the end of the training epoch (True) or of
            validation (False); unset, decided as ``ModelCheckpoint`` does.
        save_weights_only: save only the model weights and loop state (no exact resume).
        save_on_exception: save when training raises (single process only).
        gradient_checkpointing: activation checkpointing for the model: ``True``, a mode name
            (``"selective"``), a dict (``{"mode": "every_n", "every_n": 2}``) or an
            :class:`~ckpt_plugins.activation.ActivationCheckpointing`; applied at fit start.
        on_error: ``"raise"`` surfaces a failed background save at the next save; ``"warn"``
            logs it and training goes on.
        verify: check checksums when loading.
        save_on_preemption: on one of ``preemption_signals`` (SLURM, Kubernetes, spot
            instances), save at the next step boundary all ranks agree on, wait until it is
            durable, and stop training (``trainer.should_stop``); the process then ends with the
            signal (docs/preemption.md). ``False``: Lightning's own SIGTERM handling.
        preemption_signals: signal names, default ``["SIGTERM", "SIGUSR1"]``.
        preemption_sync_every: under DDP, the ranks exchange their preemption flag every N steps.
        dedup: store tensors unchanged since the previous checkpoint (a frozen backbone, the base
            of a LoRA model, whose weights the checkpoint dict holds in full) as references to
            the shared file that already holds them (docs/dedup.md).
        log_metrics: send each save's figures to the trainer's loggers as ``checkpoint/stall_ms``
            (training blocked), ``checkpoint/durable_s`` (until committed) and
            ``checkpoint/bytes``.
        memory_every_n_steps: the in-memory tier (docs/memory_tier.md): save every N optimizer
            steps as a snapshot in host shared memory that outlives the process; the step
            trigger (instead of ``every_n_train_steps``). ``ckpt_path="last"`` resumes from the
            newest of memory and disk.
        persist_every_n_steps: with ``memory_every_n_steps``, the saves of steps divisible by K
            also go to ``dirpath`` (a multiple of ``memory_every_n_steps``; default: every save).
        storage_options: for a URL ``dirpath`` (``s3://...``): passed to its fsspec file system
            (endpoint, credentials), as ``CheckpointManager(storage_options=...)``; never saved
            or logged. Lightning's own checks of ``ckpt_path`` use the environment.
        mirror: the local-first tier for a URL ``dirpath`` (docs/storage.md): every save commits
            to this local directory (training waits for a local disk, not the store), and is
            uploaded to ``dirpath`` in the background; ``ckpt_path="last"`` prefers the local
            copy. Under DDP it must be a directory every rank sees (one host or a shared file
            system).
        keep_local: with ``mirror``, keep the newest N uploaded checkpoints locally too.

    Raises:
        ConfigError: an option is invalid (the message names it); every option is checked here,
            the manager's by the core's options model.

    Example:
        >>> trainer = Trainer(callbacks=[CheckpointCallback("ckpts", keep_last=2, keep_best=1,  # doctest: +SKIP
        ...                                                 monitor="val_loss", every_n_train_steps=100)])
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        *,
        auto_insert_metric_name: bool = True,
        enable_version_counter: bool = True,
        save_last: bool | Literal["link"] | None = None,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_every_n_steps: int | None = None,
        keep_time_interval: float | timedelta | None = None,
        overwrite: bool = False,
        async_save: bool = True,
        max_pending: int = 1,
        snapshot: Literal["safe", "overlap"] = "safe",
        writer: Literal["thread", "process"] = "thread",
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: float | timedelta | None = None,
        save_on_train_epoch_end: bool | None = None,
        save_weights_only: bool = False,
        save_on_exception: bool = False,
        gradient_checkpointing: bool | str | dict[str, Any] | ActivationCheckpointing | None = None,
        on_error: Literal["raise", "warn"] = "raise",
        verify: bool = True,
        save_on_preemption: bool = True,
        preemption_signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        preemption_sync_every: int = 10,
        dedup: bool = False,
        log_metrics: bool = True,
        memory_every_n_steps: int | None = None,
        persist_every_n_steps: int | None = None,
        storage_options: dict[str, Any] | None = None,
        mirror: str | os.PathLike | None = None,
        keep_local: int = 1,
    ) -> None:
        check_storage_options("storage_options", storage_options)
        self._storage_options = storage_options  # to fsspec only; not in state_dict() or repr
        self.memory_options = memory_kwargs(memory_every_n_steps, persist_every_n_steps, every_n_train_steps)
        if memory_every_n_steps is not None:
            every_n_train_steps = memory_every_n_steps  # the step trigger; persist_every_n_steps picks the durable ones
        self.triggers = Triggers(every_n_train_steps, every_n_epochs, train_time_interval, save_on_train_epoch_end)
        self.gradient_checkpointing = ActivationCheckpointing.from_value(gradient_checkpointing)
        self.manager_options: dict[str, Any] = dict(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every_n_steps=keep_every_n_steps,
            keep_time_interval=keep_time_interval,
            overwrite=overwrite,
            async_save=async_save,
            max_pending=max_pending,
            snapshot=snapshot,
            writer=writer,
            on_error=on_error,
            verify=verify,
            save_on_preemption=save_on_preemption,
            preemption_signals=preemption_signals,
            preemption_sync_every=preemption_sync_every,
            dedup=dedup,
            mirror=mirror,
            keep_local=keep_local,
        )
        interval = timedelta(seconds=self.triggers.interval_s) if train_time_interval is not None else None
        super().__init__(
            dirpath=os.fspath(dirpath) if dirpath is not None else None,
            filename=filename,
            auto_insert_metric_name=auto_insert_metric_name,
            enable_version_counter=enable_version_counter,
            save_last=save_last,
            monitor=monitor,
            mode=mode,
            save_top_k=-1,
            save_weights_only=save_weights_only,
            save_on_exception=save_on_exception,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            train_time_interval=interval,
            save_on_train_epoch_end=save_on_train_epoch_end,
        )
        self.manager_options["name_template"] = self.name_template()
        ManagerOptions.from_flat(**self.manager_options)  # every option checked now, by the core's model
        self.async_save, self.max_pending, self.snapshot, self.writer = async_save, max_pending, snapshot, writer
        self.log_metrics = log_metrics
        self.stats = SaveStats()
        self.manager: CheckpointManager | None = None
        self._position = DataPosition()
        self._resume: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._deferred: str | None = None
        self._said: set[str] = set()
        self._warned_hparams: set[str] = set()
        self._step_saved = -1
        self._saved_path: str | None = None  # the name of this run's latest save
        self._seen_metrics: dict[str, float] = {}
        self._validated = False
        self._unforward: Any = None
        self._boundary = -1
        self.preempted_at: int | None = None
        """The step saved and stopped at after a preemption signal (None: not preempted)."""

    def name_template(self) -> str:
        """The core's template for this callback's names (``epoch={epoch}-step={step}{version}.ckpt``),
        made by ``ModelCheckpoint.format_checkpoint_name`` itself with placeholders for the fields,
        so the names it lists are exactly those Lightning's formatting gives."""
        return checkpoint_name_template(self)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and deep-copied without the live manager (``ddp_spawn`` sends callbacks to its
        workers; each builds its own at ``setup``)."""
        skip = ("manager", "_read_only", "_unforward")
        return {k: v for k, v in self.__dict__.items() if k not in skip} | {"manager": None, "_unforward": None}

    # --- set-up and tear-down ----------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        self._fs = get_filesystem(self.dirpath)
        fitting = stage == TrainerFn.FITTING
        options = (
            self.manager_options
            if fitting
            else dict(monitor=self.monitor, mode=self.mode, verify=self.manager_options["verify"], **self._mirror())
        ) | {"name_template": self.name_template()}
        self._drop_reader()
        memory = self.memory_options if fitting else {}
        self.manager = CheckpointManager(
            self.dirpath, read_only=not fitting, storage_options=self._storage_options, **options, **memory
        )
        register_manager(self.manager)  # loads of its folders (ckpt_path=...) go through it
        if model_parallel.needs_install(trainer.strategy):  # FSDP2/TP: sharded resume (model_parallel.py)
            model_parallel.install(trainer.strategy)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close(trainer)

    def _close(self, trainer: Any) -> None:
        self._stop_watch()
        manager, self.manager = self.manager, None
        self._drop_reader()
        if manager is None:
            return
        unregister_manager(manager)
        try:
            manager.close()
        except Exception as exc:
            log.error("closing the checkpoint manager for %s: %s", manager.directory, exc)
        self._deliver(trainer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Apply activation checkpointing; its guards' findings go into one WARNING line."""
        if not self.gradient_checkpointing.enabled:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ActivationCheckpointingWarning)  # they are the report's notes
            report = apply_activation_checkpointing(pl_module, self.gradient_checkpointing)
        wrapped = ", ".join(f"{w.path} ({w.class_name})" for w in report.wrapped) or "nothing"
        notes = "".join(f"; note: {n}" for n in report.notes)
        log.warning(
            "activation checkpointing (mode=%s, %s): wrapped %d module(s): %s%s",
            report.mode,
            report.mechanism,
            len(report.wrapped),
            wrapped,
            notes,
        )

    # --- resume ------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._resume = checkpoint.pop(RANK_STATE_KEY, None)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.triggers.start()
        self._step_saved = trainer.global_step
        self._check_no_later_checkpoints(trainer)
        self._position.track(trainer)
        if self.manager is not None and not self.manager.read_only:
            self._unforward = preemption.start_watch(trainer, self.manager)
        resume, self._resume = self._resume, None
        if trainer.ckpt_path is None:
            return
        if resume is None:
            self._say(
                "no-rank-state",
                logging.WARNING,
                "resuming from %s, which has no RNG state or data position "
                "for this rank: training continues, but not bit-exactly",
                trainer.ckpt_path,
            )
            return
        self._position.resume(trainer, resume["data"], (resume.get("rng") or {}).get("torch"))
        self._rng_to_restore = resume["rng"]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """First batch after a resume: the RNG state goes back to the checkpoint's, at the one point
        both runs pass through whatever Lightning did in between (it may start a data iterator,
        which draws, depending on where in the loop the checkpoint was taken)."""
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
            self._position.replay_draws_after_save(trainer)

    def _check_no_later_checkpoints(self, trainer: Any) -> None:
        """Before training, not at the first save: the core's start-of-run check (a fresh run
        before an earlier run's later checkpoints is refused; a resumed one may save past them)."""
        if self.manager is not None and not self.manager.read_only:
            self.manager.start_run(
                trainer.global_step,
                resumed=trainer.ckpt_path is not None,
                hint="Resume with fit(..., ckpt_path='last'), choose another dirpath, or pass "
                "CheckpointCallback(overwrite=True).",
            )

    # --- triggers ----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._position.track(trainer)  # loaders may have been reloaded

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._deliver(trainer)
        if self._skip(trainer) or self._preempted(trainer):
            return
        reason = self.triggers.due_after_batch(trainer)
        if reason is None:
            return
        if self.monitor is not None and self.monitor not in self._metrics(trainer) and not self._validated:
            self._defer(
                reason,
                "missing-monitor",
                logging.INFO,
                "monitored metric %r is not available at step %d; the save is deferred to the end of the "
                "next validation, as ModelCheckpoint does (logged once)",
                self.monitor,
                trainer.global_step,
            )
        elif validation_follows(trainer):
            self._defer(
                reason,
                "validation-follows",
                logging.DEBUG,
                "step %d: validation runs next; the save is taken at its end",
                trainer.global_step,
            )
        else:
            self._save(trainer, reason)

    def _preempted(self, trainer: Any) -> bool:
        """At each optimizer-step boundary: after a preemption signal (agreed by all ranks) save
        this step, wait until it is durable, and stop training."""
        step = trainer.global_step
        if step == self._boundary or self.manager is None:
            return self.preempted_at is not None
        self._boundary = step
        if not self.manager.preemption_requested(step):
            return False
        self.preempted_at = step
        self._save(trainer, "preemption")  # a no-op when a periodic save took this step already
        self.manager.wait()
        trainer.should_stop = True
        trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = 0, None  # stop now, whatever the minimum
        log.warning("preemption: step %d is durable; training stops", step)
        return True

    def _stop_watch(self) -> None:
        unforward, self._unforward = self._unforward, None
        if unforward is not None:
            unforward()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.manager is not None and self.snapshot == "overlap":
            self.manager.wait_for_snapshot()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._skip(trainer):
            return
        if self.triggers.on_train_epoch_end(trainer) and self.triggers.due_at_epoch(trainer):
            self._save(trainer, "every_n_epochs")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._skip(trainer):
            return
        self._validated = True
        if self._deferred:
            reason, self._deferred = self._deferred, None
            self._save(trainer, reason)
        elif not self.triggers.on_train_epoch_end(trainer) and self.triggers.due_at_epoch(trainer):
            self._save(trainer, "every_n_epochs")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Save if asked to (single process), then flush and release the directory: Lightning
        does not call ``teardown`` after an exception."""
        try:
            if self.save_on_exception and self.manager is not None and not self._skip(trainer):
                if trainer.world_size > 1:
                    log.warning(
                        "save_on_exception is skipped under DDP: the other ranks may not be able to join a save"
                    )
                elif trainer.global_step != self._step_saved:
                    self._save(trainer, "exception")
                    self.manager.wait()
                    log.info("saved step %d after %s: %s", trainer.global_step, type(exception).__name__, exception)
        finally:
            self._close(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._deferred and not self._skip(trainer) and trainer.global_step != self._step_saved:
            self._say(
                "deferred-at-end",
                logging.WARNING,
                "a save (%s) was waiting for %r, which was not logged before training ended; saving step %d "
                "now without it (it ranks last for keep_best)",
                self._deferred,
                self.monitor,
                trainer.global_step,
            )
            self._save(trainer, self._deferred)
        self._deferred = None
        self._stop_watch()
        if self.manager is not None:
            self.manager.wait()  # every save committed (or its error raised) before fit() returns
        self._deliver(trainer)

    # --- state of the callback itself ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "dirpath": self.dirpath,
            "monitor": self.monitor,
            "deferred": self._deferred,
            "metrics": dict(self._seen_metrics),
            "best_model_path": self.best_model_path,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") not in (None, self.dirpath):
            log.warning(
                "this checkpoint was written to %s, the callback now saves to %s; retention "
                "applies to the new directory only",
                state_dict["dirpath"],
                self.dirpath,
            )
            return
        self._deferred = state_dict.get("deferred")
        self._seen_metrics = dict(state_dict.get("metrics") or {})
        self._last_model_path = state_dict.get("last_model_path") or ""  # save_last reuses its name

    # --- saving ------------------------------------------------------------------------------
    def _skip(self, trainer: Any) -> bool:
        return (
            self.manager is None
            or bool(trainer.fast_dev_run)
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
        )

    def _defer(self, reason: str, key: str, level: int, message: str, *args: Any) -> None:
        self._deferred = reason
        self._say(key, level, message, *args)

    def _save(self, trainer: Any, reason: str) -> None:
        step = trainer.global_step
        if step == self._step_saved or self.manager is None:
            return
        metrics = self._metrics(trainer)  # before the dict is built: the callback's state holds them
        if self._deferred == reason:
            self._deferred = None
        fields = {k: torch.tensor(v) for k, v in metrics.items()} | self._monitor_candidates(trainer)
        # Lightning's names and -vN; without a monitor the previous save's name may be reused (replaced), as there
        replaced = self._saved_path if self.monitor is None else None
        filepath = self._get_metric_interpolated_filepath_name(fields, trainer, replaced)
        last = self._last_name(fields, trainer) if self.save_last else None
        if last is not None:
            self._last_model_path = last  # before the dict is built, as ModelCheckpoint does
        checkpoint = build_checkpoint(trainer, filepath, self.save_weights_only)
        state, converted = to_storable(checkpoint, self._warned_hparams) if checkpoint is not None else (None, [])
        rank_state = {"rng": capture_rng(), "data": self._position.state(trainer)}
        if self.monitor is not None and self.monitor not in metrics:
            self._say(
                "monitor-absent",
                logging.WARNING,
                "monitored metric %r was not logged by step %d; the "
                "metrics logged so far are %s. Check the name (self.log(%r, ...)); this checkpoint ranks "
                "last for keep_best (logged once)",
                self.monitor,
                step,
                sorted(metrics) or "none",
                self.monitor,
            )
        try:
            user_metadata = {
                "kind": "lightning",
                "reason": reason,
                "epoch": trainer.current_epoch,
                "hyper_parameters_converted": converted,
            }
            handle = self.manager.save(
                step,
                state,
                metrics,
                rank_state=rank_state,
                user_metadata=user_metadata,
                name=os.path.basename(filepath),
            )
            if last is not None:  # save_last: the state again, under the name Lightning gives it, as ModelCheckpoint
                again = build_checkpoint(trainer, last, self.save_weights_only)
                self.manager.save(
                    step,
                    to_storable(again, self._warned_hparams)[0] if again is not None else None,
                    metrics,
                    rank_state=rank_state,
                    user_metadata=user_metadata,
                    name=os.path.basename(last),
                )
        except UnsupportedStateError as exc:
            raise explain_unsupported(exc) from None
        self._step_saved = step
        self._saved_path = filepath
        if handle is None:
            return
        record = self.stats.saved(handle)
        if self.log_metrics:
            self.stats.log_to(trainer, record, ("stall_ms", "bytes"))
        if handle.done():  # synchronous: durable_s is known now
            self._deliver(trainer)

    def file_exists(self, filepath: str | os.PathLike, trainer: Any) -> bool:
        """Whether a checkpoint name is taken, for Lightning's ``-vN`` rule: on disk, or by a save
        still in flight (rank 0's answer is the one used: the manager agrees on its name)."""
        if self.manager is not None:
            return self.manager.name_taken(os.path.basename(os.fspath(filepath)))
        return bool(self._fs.exists(filepath))

    def _last_name(self, fields: dict[str, Any], trainer: Any) -> str:
        """``last.ckpt`` (``CHECKPOINT_NAME_LAST``), or ``-vN`` if another run's file has the name."""
        filepath = self.format_checkpoint_name(dict(fields), self.CHECKPOINT_NAME_LAST)
        version = self.STARTING_VERSION
        while (
            self._enable_version_counter and self.file_exists(filepath, trainer) and filepath != self._last_model_path
        ):
            filepath = self.format_checkpoint_name(dict(fields), self.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        return filepath

    def _metrics(self, trainer: Any) -> dict[str, float]:
        """The latest value of every scalar metric logged so far, this run or before a resume.

        Lightning does not restore ``callback_metrics`` on resume; remembering them in the
        callback's state lets the first saves after a resume rank (and defer) exactly as they
        would have without the interruption.
        """
        for name, value in trainer.callback_metrics.items():
            scalar = isinstance(value, torch.Tensor) and value.numel() == 1
            if scalar or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                self._seen_metrics[name] = float(value)
        return dict(self._seen_metrics)

    def _deliver(self, trainer: Any) -> None:
        """Log what committed in the background since the last call; tell the loggers."""
        done = self.stats.drain()
        for record in done:
            if self.log_metrics:
                self.stats.log_to(trainer, record, ("durable_s",))
        if done:
            self._notify_loggers(trainer)

    def _notify_loggers(self, trainer: Any) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _say(self, key: str, level: int, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, message, *args)

    def __repr__(self) -> str:
        return f"CheckpointCallback(dirpath={self.dirpath!r}, {self.manager_options})"
