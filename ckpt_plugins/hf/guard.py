"""Deprecated: :func:`guard_latest` moved damaged newest checkpoints aside when the Trainer was built.

The callback no longer renames anything (an explicit ``resume_from_checkpoint=<path>`` must find
its folder); the choice of the newest usable checkpoint is the core's
(:func:`ckpt_plugins.restore.choose.latest_usable`) and :mod:`ckpt_plugins.hf.resume` uses it.
This module keeps the old entry point for code that called it directly; it will be removed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ckpt_plugins.hf.resume import trainer_folder_problems
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.restore.choose import latest_usable

__all__ = ["GuardFinding", "guard_latest"]


@dataclass(frozen=True)
class GuardFinding:
    """One damaged checkpoint that was moved aside."""

    path: str
    moved_to: str
    problems: tuple[str, ...]


def guard_latest(manager: CheckpointManager) -> list[GuardFinding]:
    """Deprecated: move damaged newest ``checkpoint-N`` folders aside (rank 0, writable manager).

    Use ``latest_usable(manager.layout, foreign=trainer_folder_problems, quarantine=True)``.
    """
    warnings.warn(
        "ckpt_plugins.hf.guard_latest is deprecated: use ckpt_plugins.restore.choose.latest_usable "
        "(quarantine=True) or ckpt_plugins.hf.last_usable_checkpoint",
        DeprecationWarning,
        stacklevel=2,
    )
    choice = latest_usable(manager.layout, foreign=trainer_folder_problems, quarantine=True)
    return [GuardFinding(d.path, d.moved_to, d.problems) for d in choice.damaged if d.moved_to is not None]
