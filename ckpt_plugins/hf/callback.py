"""``CheckpointCallback``: the Trainer's checkpoints, written crash-safe and in the background.

The callback takes over saving from the Trainer: at each point where the Trainer would have saved
(its ``save_strategy``/``save_steps``, or our ``every_n_train_steps``) it clears
``control.should_save`` and saves through :class:`~ckpt_plugins.CheckpointManager` instead,
with ``dir_prefix="checkpoint-"``, so the committed folders are the Trainer's own
``checkpoint-N`` with the Trainer's own files in them (:mod:`.native`) plus our ``manifest.json``.
The Trainer resumes from them by itself; a save in progress lives in a hidden
``.tmp-checkpoint-N-*`` folder, so a half-written checkpoint is never visible as ``checkpoint-N``.

When the save happens. The Trainer saves at the end of ``_maybe_log_save_evaluate``, after the
step's log and evaluation, and the checkpoint must capture the same moment (the RNG state, the
log history, the evaluation metrics that rank it). The last callback event before that point is
``on_evaluate`` when the step evaluates, else ``on_log`` when it logs, else ``on_step_end``; the
callback decides at ``on_step_end``/``on_epoch_end`` and saves at the last of those events.

Events, in the order they matter:

* ``on_init_end``: resolve options against ``TrainingArguments`` (:mod:`.options`), apply
  activation checkpointing (:mod:`.gradient_checkpointing`), check the newest ``checkpoint-N``
  before ``train()`` can resume from it and resolve ``--resume_from_checkpoint True``
  (:mod:`.resume`; nothing is moved).
* ``on_train_begin``: open the manager and check where the run starts against the checkpoints
  there (``CheckpointManager.start_run``: a resume from an older checkpoint replaces the later
  ones as its saves commit); on resume, compare the data position (:mod:`.position`).
* ``on_pre_optimizer_step``: with ``snapshot="overlap"``, wait until the last save has copied
  the state, before the optimizer changes it.
* ``on_train_end``: wait for pending saves, log a summary, release the directory.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckpt_plugins.activation import ActivationCheckpointing, ActivationCheckpointingReport
from ckpt_plugins.distributed import broadcast_object, rank_and_world
from ckpt_plugins.errors import ConfigError, CorruptCheckpointError
from ckpt_plugins.hf import fsdp
from ckpt_plugins.hf import gradient_checkpointing as gc_wiring
from ckpt_plugins.hf.arguments import CheckpointArguments
from ckpt_plugins.hf.native import native_files, native_files_warmup, tokenizer_files
from ckpt_plugins.hf.options import CallbackOptions, Settings, resolve
from ckpt_plugins.hf.position import DataPosition, check_resume
from ckpt_plugins.hf.resume import choose, localize, resolve_flag, with_memory
from ckpt_plugins.hf.rng import gather_rng_states
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.restore.choose import Choice

__all__ = ["CheckpointCallback", "SaveRecord"]

log = logging.getLogger(__name__)

# The manager a callback has open on each checkpoint directory, in this process. A train() that
# raised never reaches on_train_end, so its manager (pending saves, writer, directory lock) stays
# open; the next Trainer on that directory closes it (see CheckpointCallback._take_over_directory).
_OPEN_ON: dict[str, CheckpointManager] = {}

_RESUME_HINT = (
    "Resume from the newest with trainer.train(resume_from_checkpoint=True) (--resume_from_checkpoint "
    "True), pass overwrite=True (--ckpt_overwrite) to replace them as this run's saves commit, or use "
    "another output_dir / dirpath."
)


@dataclass(frozen=True)
class SaveRecord:
    """One save made by the callback in this process."""

    step: int
    stall_s: float
    """How long ``save()`` blocked training (copying the state included): the handle's
    ``stats["stall_s"]``, measured by the core."""
    metrics: dict[str, float]


@dataclass
class _Pending:
    """A save decided at ``on_step_end``/``on_epoch_end``, made at the step's last event."""

    step: int
    await_log: bool
    await_eval: bool
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointCallback(TrainerCallback):
    """Crash-safe, asynchronous checkpoints for ``transformers.Trainer``, in its own layout.

    Args:
        dirpath: checkpoint directory; default ``TrainingArguments.output_dir`` (where
            ``resume_from_checkpoint=True`` and ``get_last_checkpoint`` look).
        keep_last: keep the N most recent checkpoints; default ``save_total_limit`` (None: all).
        keep_best: keep the N best by ``monitor``. The best one is always kept once a monitor is
            known.
        monitor: metric that ranks checkpoints (an evaluation metric such as ``"eval_loss"``, or
            the training ``"loss"``); default ``metric_for_best_model``.
        mode: ``"min"`` or ``"max"``; default from ``greater_is_better`` (else ``"min"``).
        keep_every_n_steps: also keep, for good, steps that are multiples of N.
        keep_time_interval: also keep the first checkpoint of each interval (seconds/timedelta).
        overwrite: let a fresh run (not resumed) save into a directory that has checkpoints
            (they are replaced as its saves commit). Without it such a run stops at
            ``on_train_begin`` with instructions. A resume from an older checkpoint needs no
            option: the later checkpoints stay until the resumed run's first save commits.
        async_save: write in the background; training waits only for the copy of the state.
        max_pending: at most this many saves in flight.
        snapshot: ``"safe"`` copies the state inside the save; ``"overlap"`` lets the copy run
            during the next forward/backward and waits in ``on_pre_optimizer_step``.
        writer: ``"thread"`` (default) or ``"process"``: weights written by a separate process
            from shared-memory copies, so the writer does not compete with training for the GIL.
        every_n_train_steps: save every N optimizer steps and at the last step; default: follow
            ``save_strategy``/``save_steps`` (``"steps"``, ``"epoch"``, ``"best"``).
        gradient_checkpointing: activation checkpointing (``True``, a mode name, a dict with
            ``mode``/``every_n``/``targets``, or an ``ActivationCheckpointing``); extends
            ``--activation_checkpointing`` and works for models without transformers support.
        on_error: ``"raise"``: a failed background save is raised at the next save (training
            stops); ``"warn"``: it is logged and training goes on.
        verify_latest: when the Trainer is built, check the newest ``checkpoint-N`` and warn
            when it is damaged; nothing is moved (see :mod:`ckpt_plugins.hf.resume`).
        save_on_preemption: on one of ``preemption_signals``, save at the next step all ranks
            agree on, wait until it is durable, and stop (``control.should_training_stop``);
            ``train()`` returns and the process ends with the signal at exit (docs/preemption.md).
        preemption_signals: signal names, default ``["SIGTERM", "SIGUSR1"]``.
        preemption_sync_every: under ``torch.distributed``, exchange the flag every N steps.
        memory_every_n_steps: the in-memory tier (docs/memory_tier.md): save every N steps as a
            snapshot in host shared memory that outlives the process (the step trigger, instead
            of ``every_n_train_steps``); ``--resume_from_checkpoint True`` and
            ``last_usable_checkpoint(dir, memory_tier=True)`` pick the newest of memory and disk.
        persist_every_n_steps: with ``memory_every_n_steps``, steps divisible by K also go to the
            directory (a multiple of it; default: every save).
        mirror: with a URL ``dirpath`` (``s3://...``), a local directory every save commits to
            first; each checkpoint is uploaded in the background, and ``--resume_from_checkpoint
            True`` prefers the local copy (docs/storage.md). Under DDP a directory every rank sees.
        keep_local: with ``mirror``, keep the newest N uploaded checkpoints locally too.

    Example:
        >>> trainer = Trainer(model=model, args=TrainingArguments("out", save_steps=100),
        ...                   train_dataset=ds, callbacks=[CheckpointCallback(keep_last=3)])  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # after a crash  # doctest: +SKIP
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        keep_every_n_steps: int | None = None,
        keep_time_interval: float | timedelta | None = None,
        overwrite: bool = False,
        async_save: bool = True,
        max_pending: int = 1,
        snapshot: Literal["safe", "overlap"] = "safe",
        writer: Literal["thread", "process"] = "thread",
        every_n_train_steps: int | None = None,
        gradient_checkpointing: bool | str | dict | ActivationCheckpointing | None = None,
        on_error: Literal["raise", "warn"] = "raise",
        verify_latest: bool = True,
        save_on_preemption: bool = True,
        preemption_signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        preemption_sync_every: int = 10,
        memory_every_n_steps: int | None = None,
        persist_every_n_steps: int | None = None,
        storage_options: dict[str, Any] | None = None,
        mirror: str | os.PathLike | None = None,
        keep_local: int = 1,
    ) -> None:
        self.options = CallbackOptions(
            dirpath=os.fspath(dirpath) if dirpath is not None else None,
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
            every_n_train_steps=every_n_train_steps,
            gradient_checkpointing=gradient_checkpointing,
            on_error=on_error,
            verify_latest=verify_latest,
            save_on_preemption=save_on_preemption,
            preemption_signals=preemption_signals,
            preemption_sync_every=preemption_sync_every,
            memory_every_n_steps=memory_every_n_steps,
            persist_every_n_steps=persist_every_n_steps,
            storage_options=storage_options,
            mirror=os.fspath(mirror) if mirror is not None else None,
            keep_local=keep_local,
        )
        self.settings: Settings | None = None
        self.manager: CheckpointManager | None = None
        self.activation_report: ActivationCheckpointingReport | None = None
        self.resume_check: Choice | None = None
        """The newest usable checkpoint found when the Trainer was built (``verify_latest``)."""
        self.saves: list[SaveRecord] = []
        self._pending: _Pending | None = None
        self._last_log_step = -1
        self._last_logs: dict[str, float] = {}
        self._tokenizer: dict[str, bytes] | None = None
        self._saved_steps: set[int] = set()
        self._activation_plan: gc_wiring.ActivationPlan | None = None
        self._seen_metrics: set[str] = set()
        self._monitor_warned = False
        self._prepared = False  # the staging memory of the first save was asked for (or made)
        self.preempted_at: int | None = None
        """The step saved and stopped at after a preemption signal (None: not preempted)."""

    @classmethod
    def from_args(cls, args: CheckpointArguments) -> CheckpointCallback:
        """Build the callback from parsed ``CheckpointArguments`` (``--ckpt_*`` flags)."""
        options = args.to_options()
        callback = cls(**{name: getattr(options, name) for name in CallbackOptions.__dataclass_fields__})
        callback.options = options  # errors found at on_init_end name the --ckpt_ flags
        return callback

    # --- set-up ----------------------------------------------------------------------------------
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        self.settings = resolve(self.options, args)
        if model is not None:
            self._activation_plan = gc_wiring.plan(self.options.gradient_checkpointing, args, model)
            self.activation_report = gc_wiring.apply_plan(self._activation_plan, model, args)
        if os.path.abspath(self.settings.dirpath) != os.path.abspath(str(args.output_dir)):
            log.info(
                "checkpoints go to %s, not output_dir: resume with resume_from_checkpoint="
                "get_last_checkpoint(%r) (resume_from_checkpoint=True looks in output_dir)",
                self.settings.dirpath,
                self.settings.dirpath,
            )
        self._take_over_directory()
        self._check_latest(args)
        trainer = fsdp.find_trainer()  # on_init_end runs inside Trainer.__init__
        if trainer is not None:
            fsdp.install(trainer)  # resumes from sharded (FSDP2) folders of ours (hf/fsdp.py)

    def _take_over_directory(self) -> None:
        """Close the manager an earlier, aborted train() left open on this directory: its pending
        saves commit (so they can be resumed from) and the directory lock is released."""
        assert self.settings is not None
        earlier = _OPEN_ON.pop(_directory_key(self.settings.dirpath), None)
        if earlier is not None and earlier is not self.manager:  # entries are removed at a normal close
            log.warning(
                "closing the checkpoint manager an earlier Trainer left open on %s (its train() "
                "raised before the end); its pending saves are committed first",
                self.settings.dirpath,
            )
            earlier.close()

    def _check_latest(self, args: TrainingArguments) -> None:
        """Warn about a damaged newest checkpoint (nothing is moved) and resolve
        ``--resume_from_checkpoint True`` (:mod:`.resume`). Rank 0 checks; every rank uses its answer."""
        assert self.settings is not None
        if not self.settings.verify_latest:
            args.resume_from_checkpoint = resolve_flag(args.resume_from_checkpoint, None, self.settings.dirpath)
            return
        mirror = self.settings.manager_kwargs["mirror"]
        rank_0 = rank_and_world()[0] == 0
        choice = choose(self.settings.dirpath, self.settings.storage_options, mirror) if rank_0 else None
        if choice is not None and self.options.memory_every_n_steps is not None:
            choice = with_memory(choice, self.settings.dirpath)  # the in-memory tier's newest, if newer
        self.resume_check = choice = broadcast_object(choice)
        newest = choice.damaged[0] if choice.damaged else None
        if newest is not None and rank_and_world()[0] == 0:
            log.warning(
                "resume_from_checkpoint=True would still load %s (the Trainer does not check it); %s. "
                "--resume_from_checkpoint True (with CheckpointArguments) and ckpt_plugins.hf."
                "last_usable_checkpoint(%r) skip it. Nothing was moved: an explicit "
                "resume_from_checkpoint=<path> is loaded as given",
                newest.path,
                f"the newest usable one is {choice.path}" if choice.path else "no checkpoint is usable",
                self.settings.dirpath,
            )
        args.resume_from_checkpoint = localize(  # an object store: a local copy the Trainer can read
            resolve_flag(args.resume_from_checkpoint, choice, self.settings.dirpath),
            self.settings.dirpath,
            str(args.output_dir),
            self.settings.storage_options,
        )

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.settings is None:  # added with trainer.add_callback() after __init__
            log.warning(
                "CheckpointCallback was added after the Trainer was built: the newest "
                "checkpoint was not checked before resuming; pass it in callbacks=[...]"
            )
            self.settings = resolve(self.options, args)
        if model is not None:  # again: a model_init Trainer builds a new model in train()
            if self._activation_plan is None:
                self._activation_plan = gc_wiring.plan(self.options.gradient_checkpointing, args, model)
            report = gc_wiring.apply_plan(self._activation_plan, model, args)
            self.activation_report = report or self.activation_report
        if self.manager is None:
            self._take_over_directory()  # also here: a callback added after the Trainer was built
            self.manager = CheckpointManager(
                self.settings.dirpath, storage_options=self.settings.storage_options, **self.settings.manager_kwargs
            )
            _OPEN_ON[_directory_key(self.settings.dirpath)] = self.manager
        self.manager.watch_preemption()
        try:
            self._check_existing(args, state, train_dataloader)
        except BaseException:
            _OPEN_ON.pop(_directory_key(self.settings.dirpath), None)
            self.manager.close()
            self.manager = None
            raise
        if model is not None and rank_and_world()[0] == 0 and not fsdp.is_sharded_model(model):
            native_files_warmup(model)  # one-time transformers set-up, kept out of the first save
        if args.save_total_limit == 1 and args.load_best_model_at_end:
            log.warning(
                "save_total_limit=1 with load_best_model_at_end: at the end of training the "
                "Trainer itself deletes every checkpoint but the best one, outside the "
                "crash-safe protocol; prefer keep_last=1 (--ckpt_keep_last 1) without "
                "save_total_limit"
            )

    def _check_existing(self, args: TrainingArguments, state: TrainerState, train_dataloader: Any) -> None:
        """Where the run starts against the checkpoints there (the core's one check), and, on a
        resume from one of ours, whether the data position carries over. Warnings only, except a
        fresh run before an earlier run's checkpoints (StepExistsError, unless ``overwrite``)."""
        assert self.manager is not None and self.settings is not None
        step = state.global_step
        self.manager.start_run(step, resumed=step > 0, hint=_RESUME_HINT)
        if step and (step in self.manager.steps() or self.manager.memory_snapshot(step) is not None):
            try:  # only the data position: the Trainer has loaded the rest already
                saved = self.manager.restore(step, include="data_position").get("data_position")
            except ConfigError:  # a checkpoint of ours without a data position (older versions)
                saved = None
            except CorruptCheckpointError as exc:
                log.warning(
                    "resumed from step %d, whose checkpoint no longer matches its manifest (%s); the "
                    "Trainer loaded it, so training goes on, but the data position was not checked",
                    step,
                    exc,
                )
                saved = None
            if saved:
                current = DataPosition.capture(args, state, train_dataloader)
                for problem in check_resume(DataPosition.from_dict(saved), current, args.ignore_data_skip):
                    log.warning("resume from step %d is not exact: %s", step, problem)
        self._saved_steps = set(self.manager.steps())

    # --- deciding and saving ---------------------------------------------------------------------
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        every_n = self.settings.every_n_train_steps if self.settings else None
        if every_n is not None:
            wanted = state.global_step % every_n == 0 or state.global_step >= state.max_steps
        else:
            wanted = control.should_save
        control.should_save = False  # the Trainer's own (synchronous, non-atomic) save is replaced
        if self.manager is not None and self.manager.preemption_requested(state.global_step):
            self.preempted_at = state.global_step  # save this step, wait until durable, stop
            control.should_training_stop = wanted = True
        if wanted:
            self._prepared = True
            self._schedule(args, state, control, kwargs)
        elif not self._prepared:
            self._prepare_first_save(state, kwargs)

    def _prepare_first_save(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        """Once, after the run's first optimizer step (the optimizer's state exists by then): the
        manager allocates the staging memory of the checkpoint's tensors in the background, so the
        first save costs training only its copy."""
        self._prepared = True
        if self.manager is None or self.settings is None or rank_and_world()[0] != 0 or "model" not in kwargs:
            return
        files = native_files(
            model=kwargs["model"],
            optimizer=kwargs.get("optimizer"),
            lr_scheduler=None,
            trainer_state=state,
            rng_states=[],
            world_size=1,
            model_only=self.settings.model_only,
        )
        self.manager.prepare({}, extra_files=files)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush_pending(args, state, control, kwargs)
        wanted = control.should_save and self.settings is not None and self.settings.every_n_train_steps is None
        control.should_save = False
        if wanted:
            self._schedule(args, state, control, kwargs)
        elif control.should_training_stop and self.manager is not None:
            self.manager.wait()  # load_best_model_at_end reads committed folders next

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush_pending(args, state, control, kwargs)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._seen_metrics.update(k for k, v in (logs or {}).items() if isinstance(v, (int, float)))
        if not logs or "loss" not in logs:
            return  # evaluation and end-of-training logs
        self._last_log_step = state.global_step
        self._last_logs = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        pending = self._pending
        if pending is not None and pending.await_log and pending.step == state.global_step:
            pending.await_log = False
            if not pending.await_eval:
                self._save_pending(args, state, control, kwargs)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.manager is None or self.settings is None:
            return  # evaluate() outside train()
        metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        self._seen_metrics.update(metrics)
        self._check_monitor(evaluated=True)
        new_best = self._track_best(state, metrics)
        pending = self._pending
        if pending is not None and pending.await_eval and pending.step == state.global_step:
            pending.metrics.update(metrics)
            self._save_pending(args, state, control, kwargs)
        elif self.settings.every_n_train_steps is None and self.settings.save_strategy == "best" and new_best:
            self._pending = _Pending(state.global_step, False, False, metrics)
            self._save_pending(args, state, control, kwargs)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.manager is not None and self.settings is not None and self.settings.snapshot == "overlap":
            self.manager.wait_for_snapshot()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush_pending(args, state, control, kwargs)
        if self.manager is None:
            return
        if self.saves:
            self._check_monitor(evaluated=False)
        try:
            self.manager.wait()
            if self.saves:
                stalls = sorted(s.stall_s for s in self.saves)
                log.info(
                    "CheckpointCallback: %d save(s), training blocked per save: median %.1f ms, max %.1f ms; kept: %s",
                    len(stalls),
                    stalls[len(stalls) // 2] * 1e3,
                    stalls[-1] * 1e3,
                    self.manager.retention().keep,
                )
        finally:
            assert self.settings is not None
            if _OPEN_ON.get(_directory_key(self.settings.dirpath)) is self.manager:
                del _OPEN_ON[_directory_key(self.settings.dirpath)]
            self.manager.close()
            self.manager = None

    def _schedule(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, kwargs: dict[str, Any]
    ) -> None:
        await_log = bool(control.should_log) and state.global_step != self._last_log_step
        await_eval = bool(control.should_evaluate)
        self._pending = _Pending(state.global_step, await_log, await_eval)
        if not (await_log or await_eval):
            self._save_pending(args, state, control, kwargs)

    def _flush_pending(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, kwargs: dict[str, Any]
    ) -> None:
        if self._pending is not None:
            log.warning(
                "checkpoint of step %d taken late: the log/evaluation it waited for did not come "
                "(another callback changed control.should_log/should_evaluate?)",
                self._pending.step,
            )
            self._save_pending(args, state, control, kwargs)

    def _check_monitor(self, evaluated: bool) -> None:
        """Warn once when the monitored metric is not among those this run logs (a typo such as
        ``eval_los``): checkpoints are ranked only by the metrics they hold. An ``eval_`` metric is
        looked for after each evaluation, any other at the end of training."""
        monitor = self.settings.manager_kwargs["monitor"] if self.settings else None
        if monitor is None or self._monitor_warned or monitor in self._seen_metrics or not self._seen_metrics:
            return
        if evaluated and not monitor.startswith("eval_"):
            return
        self._monitor_warned = True
        logged = sorted(k for k in self._seen_metrics if not _is_speed_metric(k))
        close = difflib.get_close_matches(monitor, logged, n=1)
        log.warning(
            "--ckpt_monitor %r (monitor=) is not a metric this run logs (%s)%s; checkpoints are ranked "
            "by the metrics they hold, so keep_best and the best checkpoint cannot use it",
            monitor,
            ", ".join(logged),
            f"; did you mean {close[0]!r}?" if close else "",
        )

    def _track_best(self, state: TrainerState, metrics: dict[str, float]) -> bool:
        """The Trainer's best-model bookkeeping, done before the checkpoint is taken.

        ``Trainer._determine_best_metric`` runs after ``on_evaluate``, too late for the
        ``trainer_state.json`` saved here; the same rule is applied now, and the Trainer's own pass
        then finds nothing new (equal is not better), which also keeps ``save_strategy="best"``
        from triggering a save of its own.
        """
        assert self.settings is not None
        name = self.settings.metric_for_best_model
        if name is None or name not in metrics:
            return False
        value, best = metrics[name], state.best_metric
        greater = self.settings.greater_is_better
        if best is not None and not (value > best if greater else value < best):
            return False
        state.best_metric = value
        if self.settings.save_strategy in ("steps", "epoch", "best") or self.settings.every_n_train_steps:
            state.best_global_step = state.global_step
        return True

    def _save_pending(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, kwargs: dict[str, Any]
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self.manager is None:
            return
        if pending.step != state.global_step:
            log.warning(
                "a save decided at step %d was not made before step %d; skipped", pending.step, state.global_step
            )
            return
        metrics = {k: v for k, v in pending.metrics.items() if not _is_speed_metric(k)}
        if self._last_log_step == pending.step and "loss" in self._last_logs:
            metrics.setdefault("loss", self._last_logs["loss"])  # the training loss logged at this step
        self._save(args, state, control, kwargs, metrics)

    def _save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kwargs: dict[str, Any],
        metrics: dict[str, float],
    ) -> None:
        assert self.manager is not None and self.settings is not None
        step = state.global_step
        rank, world_size = rank_and_world()
        rng_states = gather_rng_states(distributed=world_size > 1)
        if state.best_global_step is not None and state.best_global_step in self._saved_steps | {step}:
            state.best_model_checkpoint = self.manager.path_for(state.best_global_step)
        # the Trainer keeps its best_model_checkpoint through rotation; so does retention, even when
        # the metric that made it best never reached us (an evaluation outside on_evaluate)
        self.manager.protect(() if state.best_global_step is None else (state.best_global_step,))
        control_state = control.state()
        if self.preempted_at == step:  # the resumed run must not stop where this one was preempted
            control_state["args"]["should_training_stop"] = False
        state.stateful_callbacks["TrainerControl"] = control_state  # type: ignore[index,call-overload]  # a dict at run time
        files = None
        sharded = fsdp.is_sharded_model(kwargs["model"])  # FSDP2: every rank saves its shards
        if rank == 0:
            if self._tokenizer is None:
                self._tokenizer = tokenizer_files(kwargs.get("processing_class"))
            files = native_files(
                model=kwargs["model"],
                optimizer=kwargs.get("optimizer"),
                lr_scheduler=kwargs.get("lr_scheduler"),
                trainer_state=state,
                rng_states=rng_states,
                world_size=world_size,
                training_args=args,
                model_only=self.settings.model_only,
                extra=self._tokenizer,
                sharded=sharded,
            )
        position = DataPosition.capture(args, state, kwargs.get("train_dataloader"))
        saved: dict[str, Any] = {"data_position": position.to_dict()}
        if sharded:
            saved.update(
                fsdp.sharded_state(kwargs["model"], kwargs.get("optimizer"), model_only=self.settings.model_only)
            )
        final = bool(control.should_training_stop or step >= state.max_steps)
        handle = self.manager.save(
            step,
            saved,
            metrics,
            extra_files=files,
            user_metadata={"written_by": "ckpt_plugins.hf"},
            wait=final,  # training waits for the last save anyway: no staging copy
        )
        if handle is not None:
            self._saved_steps.add(step)
            self.saves.append(SaveRecord(step, handle.stats["stall_s"], metrics))
            log.info(
                "checkpoint step %d: training blocked %.1f ms (%s)",
                step,
                handle.stats["stall_s"] * 1e3,
                "written in the background" if self.manager.async_save and not final else "written",
            )
        if final:
            self.manager.wait()  # the Trainer may load the best checkpoint right after this


def _is_speed_metric(name: str) -> bool:
    """``eval_runtime``, ``eval_samples_per_second``, ``epoch``...: timing, not quality; not stored."""
    return name == "epoch" or name.endswith(("_runtime", "_per_second"))


def _directory_key(dirpath: str) -> str:
    return dirpath if "://" in dirpath else os.path.abspath(dirpath)
