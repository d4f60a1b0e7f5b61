"""ckpt_plugins: crash-safe, asynchronous, retention-aware checkpoints for PyTorch.

One core (:class:`CheckpointManager`) with thin adapters for Lightning (``ckpt_plugins.lightning``)
and the Hugging Face Trainer (``ckpt_plugins.hf``). ``import ckpt_plugins`` needs torch alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ckpt_plugins.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DistributedError,
    LockedError,
    NotWritableError,
    RestoreError,
    SaveError,
    StepExistsError,
    UnsafeCheckpointError,
    UnsupportedStateError,
    WriterError,
)
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.options import (
    DistributedOptions,
    IOOptions,
    ManagerOptions,
    MemoryTierOptions,
    MirrorOptions,
    RestoreOptions,
    RetentionOptions,
    SaveOptions,
)
from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.restore.targets import RestoreReport
from ckpt_plugins.rng import capture_rng, restore_rng

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "DistributedError",
    "DistributedOptions",
    "IOOptions",
    "LockedError",
    "ManagerOptions",
    "MemoryTierOptions",
    "MirrorOptions",
    "NotWritableError",
    "RestoreError",
    "RestoreOptions",
    "RestoreReport",
    "RetentionOptions",
    "SaveError",
    "SaveHandle",
    "SaveOptions",
    "StepExistsError",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "WriterError",
    "__version__",
    "capture_rng",
    "restore_rng",
]
