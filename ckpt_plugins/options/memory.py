"""Options of the in-memory tier (:mod:`ckpt_plugins.memory`): ``CheckpointManager(memory_tier=...)``.

``memory_tier=True`` takes the defaults; ``memory_tier=MemoryTierOptions(keep=2, ...)`` sets them.
``persist_every_n_steps`` is the manager's own keyword (it is about the durable directory) and is
checked here too, so both adapters get the same rules and messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import check_bool, check_positive_int

__all__ = ["MemoryTierOptions", "memory_options_of"]


@dataclass(frozen=True)
class MemoryTierOptions:
    """How the in-memory tier keeps its snapshots.

    Every ``save()`` writes a snapshot into host shared memory (``root``, a tmpfs), which outlives
    the training process (not a reboot); see docs/memory_tier.md.
    """

    keep: int = 1
    """Snapshots kept per rank (the newest ones). The tier needs room for ``keep + 1`` (a new
    snapshot is written before the oldest goes), twice that with ``peers``."""
    budget_bytes: int | None = None
    """Most bytes of shared memory the tier may hold on this rank (own and peer snapshots);
    None: bounded by the free space of ``root`` only."""
    peers: bool = True
    """Under torch.distributed, each rank also keeps a copy of its ring peer's snapshot (rank r
    holds rank r-1's), sent in the background, so the loss of one rank's memory is recovered."""
    root: str = "/dev/shm"
    """The shared-memory file system the snapshots live in (a tmpfs: memory, not disk)."""

    def __post_init__(self) -> None:
        check_positive_int("keep", self.keep)
        check_positive_int("budget_bytes", self.budget_bytes, optional=True)
        check_bool("peers", self.peers)
        if not isinstance(self.root, str) or not os.path.isabs(self.root):
            raise ConfigError(
                f"$root must be an absolute path to a shared-memory file system, got {self.root!r}; "
                "the default is /dev/shm",
                option="root",
                value=self.root,
            )


def memory_options_of(memory_tier: Any, persist_every_n_steps: Any) -> tuple[MemoryTierOptions | None, int]:
    """``(options or None, K)`` from the manager's ``memory_tier`` and ``persist_every_n_steps``.

    Raises:
        ConfigError: a value of the wrong type, or ``persist_every_n_steps`` without the tier
            (every save is persisted then; there is nothing to space out).
    """
    if memory_tier is False or memory_tier is None:
        options = None
    elif memory_tier is True:
        options = MemoryTierOptions()
    elif isinstance(memory_tier, MemoryTierOptions):
        options = memory_tier
    else:
        raise ConfigError(
            f"$memory_tier must be True, False or a MemoryTierOptions, got {memory_tier!r}",
            option="memory_tier",
            value=memory_tier,
        )
    check_positive_int("persist_every_n_steps", persist_every_n_steps, optional=True)
    if persist_every_n_steps is not None and options is None:
        raise ConfigError(
            f"$persist_every_n_steps={persist_every_n_steps!r} needs $memory_tier: without the in-memory "
            "tier every save is persisted; pass memory_tier=True or drop persist_every_n_steps",
            option="persist_every_n_steps",
            value=persist_every_n_steps,
            mentions=("memory_tier",),
        )
    return options, 1 if persist_every_n_steps is None else persist_every_n_steps
