"""The in-memory tier: a snapshot per save in host shared memory, ring peers as the backup.

:mod:`.tier` (snapshots as committed checkpoints on a tmpfs), :mod:`.place` (where, and whether
they fit), :mod:`.peers` (the ring copy over gloo), :mod:`.hooks` (what the manager calls).
Options: :class:`ckpt_plugins.options.MemoryTierOptions`. Design: docs/memory_tier.md.
"""

from ckpt_plugins.memory.tier import MemoryTier

__all__ = ["MemoryTier"]
