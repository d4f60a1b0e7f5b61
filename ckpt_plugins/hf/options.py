"""The callback's options, and the one place where they meet ``TrainingArguments``.

:class:`CallbackOptions` holds what the user asked for (validated when built, never rewritten).
:func:`resolve` combines it with the Trainer's ``TrainingArguments`` once, at ``on_init_end``,
into :class:`Settings`, which is all the callback reads afterwards:

* the directory defaults to ``output_dir`` (where ``resume_from_checkpoint=True`` looks);
* without ``every_n_train_steps`` the save schedule follows ``save_strategy``/``save_steps``;
* without ``keep_last``, ``save_total_limit`` is used;
* without ``monitor``, ``metric_for_best_model`` is (``eval_``-prefixed as the Trainer does), and
  without ``mode``, ``greater_is_better`` decides; retention then always keeps the best one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from ckpt_plugins.activation import ActivationCheckpointing
from ckpt_plugins.errors import ConfigError, renamed_options
from ckpt_plugins.options import MirrorOptions, PreemptionOptions, RetentionOptions, SaveOptions
from ckpt_plugins.options.checks import (
    check_bool,
    check_choice,
    check_directory,
    check_positive_int,
    check_storage_options,
)
from ckpt_plugins.options.memory_steps import memory_kwargs

__all__ = ["CallbackOptions", "Settings", "resolve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallbackOptions:
    """What :class:`~ckpt_plugins.hf.CheckpointCallback` was given (see its docstring)."""

    dirpath: str | None = None
    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Literal["min", "max"] | None = None
    keep_every_n_steps: int | None = None
    keep_time_interval: float | timedelta | None = None
    overwrite: bool = False
    async_save: bool = True
    max_pending: int = 1
    snapshot: Literal["safe", "overlap"] = "safe"
    writer: Literal["thread", "process"] = "thread"
    every_n_train_steps: int | None = None
    gradient_checkpointing: bool | str | dict | ActivationCheckpointing | None = None
    on_error: Literal["raise", "warn"] = "raise"
    verify_latest: bool = True
    save_on_preemption: bool = True
    preemption_signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1")
    preemption_sync_every: int = 10
    memory_every_n_steps: int | None = None
    persist_every_n_steps: int | None = None
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """fsspec options of a URL ``dirpath`` (never shown, saved or logged)."""
    mirror: str | None = None
    keep_local: int = 1

    def __post_init__(self) -> None:
        """The core's groups check the options they share (same checks, same messages)."""
        if self.dirpath is not None:
            check_directory("dirpath", self.dirpath)
        check_storage_options("storage_options", self.storage_options)
        check_choice("mode", self.mode, (None, "min", "max"), "None follows greater_is_better")
        RetentionOptions(
            keep_last=self.keep_last,
            keep_best=None,
            monitor=self.monitor,
            mode=self.mode or "min",
            keep_every_n_steps=self.keep_every_n_steps,
            keep_time_interval=self.keep_time_interval,
            overwrite=self.overwrite,
        )
        check_positive_int("keep_best", self.keep_best, optional=True)  # its monitor may come at resolve()
        SaveOptions(
            async_save=self.async_save,
            max_pending=self.max_pending,
            snapshot=self.snapshot,
            writer=self.writer,
            on_error=self.on_error,
        )
        check_positive_int("every_n_train_steps", self.every_n_train_steps, optional=True)
        check_bool("verify_latest", self.verify_latest)
        memory_kwargs(self.memory_every_n_steps, self.persist_every_n_steps, self.every_n_train_steps)
        PreemptionOptions(
            save_on_preemption=self.save_on_preemption,
            preemption_signals=self.preemption_signals,
            preemption_sync_every=self.preemption_sync_every,
        )
        MirrorOptions(mirror=self.mirror, keep_local=self.keep_local)
        if self.gradient_checkpointing is not None:
            ActivationCheckpointing.from_value(self.gradient_checkpointing)  # raises ConfigError

    @property
    def spelled_as(self) -> Mapping[str, str]:
        """How the user spelled each option (plain name -> e.g. ``--ckpt_monitor``); errors found
        later, against ``TrainingArguments``, name the options the same way."""
        return getattr(self, "_spelled_as", {})

    def spelled(self, names: Mapping[str, str]) -> CallbackOptions:
        """These options, remembered as spelled by ``names`` (not an option: equality ignores it)."""
        object.__setattr__(self, "_spelled_as", dict(names))
        return self


@dataclass(frozen=True)
class Settings:
    """The resolved configuration the callback works with."""

    dirpath: str
    manager_kwargs: dict[str, Any]
    every_n_train_steps: int | None
    """Own schedule; None: follow ``save_strategy``."""
    save_strategy: str
    """``"no"``, ``"steps"``, ``"epoch"`` or ``"best"`` (only used when following the Trainer)."""
    metric_for_best_model: str | None
    """``eval_``-prefixed, for the Trainer's best-model bookkeeping (``best_metric``, ...)."""
    greater_is_better: bool
    snapshot: str
    verify_latest: bool
    model_only: bool
    """``save_only_model``: weights and ``trainer_state.json`` only (no optimizer, scheduler, RNG)."""
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """fsspec options of a URL ``dirpath``, for the manager only."""


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def resolve(options: CallbackOptions, args: Any) -> Settings:
    """Combine the callback's options with ``TrainingArguments`` (see the module docstring).

    Raises:
        ConfigError: ``mode`` contradicts ``greater_is_better`` for ``metric_for_best_model``, or
            ``keep_best`` is set and no metric to rank by is known (named as the user spelled
            the options: ``--ckpt_mode`` when they came from ``CheckpointArguments``).
    """
    with renamed_options(options.spelled_as):
        return _resolve(options, args)


def _resolve(options: CallbackOptions, args: Any) -> Settings:
    if getattr(args, "deepspeed", None):
        raise ConfigError(
            "CheckpointCallback does not write deepspeed (sharded) checkpoints yet, and "
            "TrainingArguments.deepspeed is set; remove the callback to let the Trainer save "
            "its own checkpoints for this run"
        )
    fsdp_version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if getattr(args, "fsdp", None) and fsdp_version != 2:
        raise ConfigError(
            f"CheckpointCallback writes FSDP2 (fully_shard) checkpoints, and TrainingArguments.fsdp_config "
            f"has version={fsdp_version} (FSDP1); set fsdp_config={{'version': 2}}, or remove the callback "
            "to let the Trainer save its own checkpoints for this run"
        )
    dirpath = os.fspath(options.dirpath) if options.dirpath is not None else args.output_dir
    if dirpath is None:
        raise ConfigError("CheckpointCallback needs a directory: pass dirpath= or set TrainingArguments.output_dir")
    metric = args.metric_for_best_model
    if metric is not None and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    greater = bool(args.greater_is_better) if args.greater_is_better is not None else False
    monitor: str | None = options.monitor
    mode: str | None = options.mode
    args_mode = "max" if greater else "min"
    # greater_is_better speaks of metric_for_best_model: a mode for the same metric (or, without
    # either monitor or metric, for the one the user has in mind) must agree with it.
    same_metric = monitor is None or monitor == metric
    if mode is not None and args.greater_is_better is not None and same_metric and mode != args_mode:
        about = f" for metric_for_best_model={args.metric_for_best_model!r}" if metric is not None else ""
        raise ConfigError(
            f"$mode={mode!r} contradicts greater_is_better={args.greater_is_better}{about}; drop "
            "$mode (it follows greater_is_better) or change one of them",
            option="mode",
            value=mode,
        )
    if monitor is None and metric is not None:
        monitor = metric
        mode = args_mode
    if args.load_best_model_at_end and metric is not None and monitor != metric:
        log.warning(
            "monitor=%r differs from metric_for_best_model=%r: retention keeps the best by %r, "
            "so the checkpoint load_best_model_at_end wants may be deleted; drop monitor to follow "
            "metric_for_best_model",
            monitor,
            metric,
            monitor,
        )
    if options.keep_best is not None and monitor is None:
        raise ConfigError(
            f"$keep_best={options.keep_best} needs a metric to rank checkpoints: set $monitor "
            "(e.g. eval_loss) or TrainingArguments.metric_for_best_model",
            option="keep_best",
            value=options.keep_best,
            mentions=("monitor",),
        )
    keep_last = options.keep_last
    if keep_last is None and args.save_total_limit:
        keep_last = int(args.save_total_limit)
        log.info("keep_last=%d, from TrainingArguments.save_total_limit", keep_last)
    strategy = _strategy(args.save_strategy)
    if options.every_n_train_steps is None and strategy == "no":
        log.warning("CheckpointCallback will not save: save_strategy='no' and every_n_train_steps is not set")
    manager_kwargs = dict(
        keep_last=keep_last,
        keep_best=options.keep_best,
        monitor=monitor,
        mode=mode or "min",
        keep_every_n_steps=options.keep_every_n_steps,
        keep_time_interval=options.keep_time_interval,
        overwrite=options.overwrite,
        async_save=options.async_save,
        max_pending=options.max_pending,
        snapshot=options.snapshot,
        writer=options.writer,
        on_error=options.on_error,
        dir_prefix="checkpoint-",
        save_on_preemption=options.save_on_preemption,
        preemption_signals=options.preemption_signals,
        preemption_sync_every=options.preemption_sync_every,
        mirror=options.mirror,
        keep_local=options.keep_local,
        **memory_kwargs(options.memory_every_n_steps, options.persist_every_n_steps, options.every_n_train_steps),
    )
    return Settings(
        dirpath=dirpath,
        manager_kwargs=manager_kwargs,
        every_n_train_steps=options.memory_every_n_steps or options.every_n_train_steps,
        save_strategy=strategy,
        metric_for_best_model=metric,
        greater_is_better=greater,
        snapshot=options.snapshot,
        verify_latest=options.verify_latest,
        model_only=bool(getattr(args, "save_only_model", False)),
        storage_options=options.storage_options,
    )
