"""PyTorch Lightning integration: a checkpoint callback, a ``CheckpointIO`` plugin, conversion.

* :class:`CheckpointCallback` - a drop-in for ``ModelCheckpoint`` with the core's retention
  (``keep_last``, ``keep_best``, ...), asynchronous saves, per-rank RNG state and data position
  for a bit-exact resume, and activation checkpointing (``gradient_checkpointing``).
* :class:`CheckpointIOPlugin` - Lightning's ``CheckpointIO`` in our format, one file per ``.ckpt``
  (atomic, checksummed, asynchronous), for existing ``ModelCheckpoint`` users: add one plugin.
* :func:`load_from_checkpoint`, :func:`to_lightning_checkpoint` - our checkpoints in
  ``LightningModule.load_from_checkpoint`` workflows and as plain ``.ckpt`` files
  (``ckpt-plugins convert --to lightning``).

``import ckpt_plugins`` never imports Lightning. Here Lightning is imported when the callback or
the plugin is first used, so the conversion helpers (and the ``ckpt-plugins`` command line) work
without paying for it; that import also lets ``MyModule.load_from_checkpoint(path)`` read our
checkpoints (:mod:`.load_hook`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckpt_plugins.lightning.convert import load_from_checkpoint, to_lightning_checkpoint
from ckpt_plugins.lightning.reader import read_lightning_checkpoint

if TYPE_CHECKING:
    from ckpt_plugins.lightning.callback import CheckpointCallback
    from ckpt_plugins.lightning.plugin import CheckpointIOPlugin

__all__ = [
    "CheckpointCallback",
    "CheckpointIOPlugin",
    "load_from_checkpoint",
    "read_lightning_checkpoint",
    "to_lightning_checkpoint",
]

_LAZY = {"CheckpointCallback": "ckpt_plugins.lightning.callback", "CheckpointIOPlugin": "ckpt_plugins.lightning.plugin"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ckpt_plugins.lightning' has no attribute {name!r}")
