"""When ``CheckpointCallback`` saves: Lightning's triggers, with Lightning's meaning.

``every_n_train_steps``, ``train_time_interval`` and ``every_n_epochs`` are mutually exclusive
(none set means ``every_n_epochs=1``); ``save_on_train_epoch_end`` chooses between the end of the
training epoch and the end of validation for epoch-based saves, decided as ``ModelCheckpoint``
decides it when left unset. A step or time save that falls on a batch right after which
validation runs is taken at the end of that validation instead: the saved state then includes the
validation's effects (metrics, RNG draws), and a resume from it does not run that validation again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ckpt_plugins.errors import ConfigError

__all__ = ["Triggers", "validation_follows"]

log = logging.getLogger(__name__)


@dataclass
class Triggers:
    """The save triggers of one callback (validated on construction; never rewritten)."""

    every_n_train_steps: int | None = None
    every_n_epochs: int | None = None
    train_time_interval: float | timedelta | None = None
    save_on_train_epoch_end: bool | None = None

    def __post_init__(self) -> None:
        for name in ("every_n_train_steps", "every_n_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.train_time_interval is not None and self.interval_s <= 0:
            raise ConfigError(
                f"train_time_interval must be positive (seconds or a timedelta), got {self.train_time_interval!r}"
            )
        chosen = [n for n in ("every_n_train_steps", "every_n_epochs", "train_time_interval") if getattr(self, n)]
        if len(chosen) > 1:
            raise ConfigError(
                f"{' and '.join(chosen)} are both set; choose one trigger (as with Lightning's ModelCheckpoint)"
            )
        self._last_time: float | None = None

    @property
    def interval_s(self) -> float:
        value = self.train_time_interval
        return value.total_seconds() if isinstance(value, timedelta) else float(value or 0.0)

    @property
    def epochs(self) -> int:
        """The epoch period (1 when no trigger is set at all)."""
        if self.every_n_epochs is not None:
            return self.every_n_epochs
        return 0 if (self.every_n_train_steps or self.train_time_interval) else 1

    def start(self) -> None:
        """Training starts (or resumes): the time interval counts from now."""
        self._last_time = time.monotonic()

    def due_after_batch(self, trainer: Any) -> str | None:
        """The trigger that fires after this training batch, or None (same answer on every rank)."""
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            return "every_n_train_steps"
        if self.train_time_interval is not None:
            now = time.monotonic()
            elapsed = self._last_time is not None and now - self._last_time >= self.interval_s
            if trainer.strategy.broadcast(elapsed):  # rank 0 decides: clocks differ across ranks
                self._last_time = now
                return "train_time_interval"
        return None

    def due_at_epoch(self, trainer: Any) -> bool:
        return self.epochs >= 1 and (trainer.current_epoch + 1) % self.epochs == 0

    def on_train_epoch_end(self, trainer: Any) -> bool:
        """Whether epoch saves happen at the end of the training epoch (else at validation end)."""
        if self.save_on_train_epoch_end is not None:
            return self.save_on_train_epoch_end
        if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch != 1:
            return False
        num_val = trainer.num_val_batches
        num_val = sum(num_val) if isinstance(num_val, list) else num_val
        return num_val == 0 or trainer.val_check_interval == 1.0


def validation_follows(trainer: Any) -> bool:
    """Whether validation runs right after the current training batch (Lightning's own test).

    Uses the training epoch loop's ``_should_check_val_fx``, the one place Lightning decides it;
    if a future Lightning moves it, the answer is False and saves are simply not deferred.
    """
    loop = trainer.fit_loop.epoch_loop
    check = getattr(loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if check is None or fetcher is None or not trainer.enable_validation:
        return False
    try:
        return bool(check(fetcher))
    except (AttributeError, TypeError):  # pragma: no cover - a different Lightning version
        return False
