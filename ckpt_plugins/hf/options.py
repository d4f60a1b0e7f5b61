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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from ckpt_plugins.activation import ActivationCheckpointing
from ckpt_plugins.errors import ConfigError

__all__ = ["CallbackOptions", "Settings", "resolve"]

log = logging.getLogger(__name__)


def _positive(option: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{option} must be a positive integer or None, got {value!r}")


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

    def __post_init__(self) -> None:
        for option in ("keep_last", "keep_best", "keep_every_n_steps", "every_n_train_steps", "max_pending"):
            _positive(option, getattr(self, option))
        if self.mode not in (None, "min", "max"):
            raise ConfigError(f"mode must be 'min', 'max' or None (None: from greater_is_better), got {self.mode!r}")
        if self.snapshot not in ("safe", "overlap"):
            raise ConfigError(f"snapshot must be 'safe' or 'overlap', got {self.snapshot!r}")
        if self.snapshot == "overlap" and not self.async_save:
            raise ConfigError("snapshot='overlap' needs async_save=True (a synchronous save has nothing to overlap)")
        if self.on_error not in ("raise", "warn"):
            raise ConfigError(f"on_error must be 'raise' or 'warn', got {self.on_error!r}")
        if self.writer not in ("thread", "process"):
            raise ConfigError(f"writer must be 'thread' or 'process', got {self.writer!r}")
        if self.writer == "process" and not self.async_save:
            raise ConfigError("writer='process' needs async_save=True (it writes the staged copies)")
        if self.keep_best is not None and self.monitor is None:
            log.debug("keep_best without monitor: the monitor comes from metric_for_best_model at init")
        if self.gradient_checkpointing is not None:
            ActivationCheckpointing.from_value(self.gradient_checkpointing)  # raises ConfigError


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


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def resolve(options: CallbackOptions, args: Any) -> Settings:
    """Combine the callback's options with ``TrainingArguments`` (see the module docstring).

    Raises:
        ConfigError: ``mode`` contradicts ``greater_is_better`` for ``metric_for_best_model``, or
            ``keep_best`` is set and no metric to rank by is known.
    """
    for name in ("fsdp", "deepspeed"):
        if getattr(args, name, None):
            raise ConfigError(f"CheckpointCallback does not write {name} (sharded) checkpoints yet, and "
                              f"TrainingArguments.{name} is set; remove the callback to let the Trainer save "
                              "its own checkpoints for this run")
    dirpath = os.fspath(options.dirpath) if options.dirpath is not None else args.output_dir
    if dirpath is None:
        raise ConfigError("CheckpointCallback needs a directory: pass dirpath= or set TrainingArguments.output_dir")
    metric = args.metric_for_best_model
    if metric is not None and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    greater = bool(args.greater_is_better) if args.greater_is_better is not None else False
    monitor, mode = options.monitor, options.mode
    if monitor is None and metric is not None:
        monitor = metric
        args_mode = "max" if greater else "min"
        if mode is not None and mode != args_mode:
            raise ConfigError(f"mode={mode!r} contradicts greater_is_better={args.greater_is_better} for "
                              f"metric_for_best_model={args.metric_for_best_model!r}; drop mode (it follows "
                              "greater_is_better) or change one of them")
        mode = args_mode
    if args.load_best_model_at_end and metric is not None and monitor != metric:
        log.warning("monitor=%r differs from metric_for_best_model=%r: retention keeps the best by %r, "
                    "so the checkpoint load_best_model_at_end wants may be deleted; drop monitor to follow "
                    "metric_for_best_model", monitor, metric, monitor)
    if options.keep_best is not None and monitor is None:
        raise ConfigError(f"keep_best={options.keep_best} needs a metric to rank checkpoints: pass "
                          "monitor= (e.g. 'eval_loss') or set TrainingArguments.metric_for_best_model")
    keep_last = options.keep_last
    if keep_last is None and args.save_total_limit:
        keep_last = int(args.save_total_limit)
        log.info("keep_last=%d, from TrainingArguments.save_total_limit", keep_last)
    strategy = _strategy(args.save_strategy)
    if options.every_n_train_steps is None and strategy == "no":
        log.warning("CheckpointCallback will not save: save_strategy='no' and every_n_train_steps is not set")
    manager_kwargs = dict(keep_last=keep_last, keep_best=options.keep_best, monitor=monitor,
                          mode=mode or "min", keep_every_n_steps=options.keep_every_n_steps,
                          keep_time_interval=options.keep_time_interval, overwrite=options.overwrite,
                          async_save=options.async_save, max_pending=options.max_pending,
                          snapshot=options.snapshot, writer=options.writer, on_error=options.on_error,
                          dir_prefix="checkpoint-")
    return Settings(dirpath=dirpath, manager_kwargs=manager_kwargs,
                    every_n_train_steps=options.every_n_train_steps, save_strategy=strategy,
                    metric_for_best_model=metric, greater_is_better=greater,
                    snapshot=options.snapshot, verify_latest=options.verify_latest,
                    model_only=bool(getattr(args, "save_only_model", False)))
