"""PyTorch Lightning integration: a checkpoint callback, a ``CheckpointIO`` plugin, conversion.

* :class:`CheckpointCallback` - a drop-in for ``ModelCheckpoint`` with the core's retention
  (``keep_last``, ``keep_best``, ...), asynchronous saves, per-rank RNG state and data position
  for a bit-exact resume, and activation checkpointing (``gradient_checkpointing``).
* :class:`CheckpointIOPlugin` - Lightning's ``CheckpointIO`` in our format (atomic, checksummed,
  asynchronous), for existing ``ModelCheckpoint`` users: add one plugin.
* :func:`load_from_checkpoint`, :func:`to_lightning_checkpoint` - our checkpoints in
  ``LightningModule.load_from_checkpoint`` workflows and as plain ``.ckpt`` files
  (``ckpt-plugins convert --to lightning``).

Importing this package imports Lightning; ``import ckpt_plugins`` does not.
"""

from ckpt_plugins.lightning.callback import CheckpointCallback
from ckpt_plugins.lightning.convert import load_from_checkpoint, to_lightning_checkpoint
from ckpt_plugins.lightning.plugin import CheckpointIOPlugin
from ckpt_plugins.lightning.reader import read_lightning_checkpoint

__all__ = ["CheckpointCallback", "CheckpointIOPlugin", "load_from_checkpoint", "read_lightning_checkpoint",
           "to_lightning_checkpoint"]
