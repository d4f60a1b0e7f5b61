"""Lightning's own loading reads our checkpoints: ``load_from_checkpoint`` and the default IO.

``LightningModule.load_from_checkpoint(path)`` and Lightning's default ``TorchCheckpointIO``
(``fit(ckpt_path=...)`` without our plugin) read every checkpoint through one function,
``lightning.fabric.utilities.cloud_io._load``, imported as ``pl_load`` by
``lightning.pytorch.core.saving`` and ``lightning.fabric.plugins.io.torch_io``. :func:`install`
puts a wrapper in those two places: a path holding one of our checkpoints (a single file, a
checkpoint folder, or a name a save of this process is still writing) is read by
:func:`~ckpt_plugins.lightning.read_lightning_checkpoint` (no pickle); anything else goes to
Lightning's function unchanged, with the same arguments.

It is installed when :mod:`ckpt_plugins.lightning.plugin` or :mod:`.callback` is imported, so a
process that only loads a model for inference needs ``import ckpt_plugins.lightning.plugin`` (or
``ckpt_plugins.lightning.load_from_checkpoint(MyModule, path)``).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from ckpt_plugins.files.single_file import is_reservation, is_single_file
from ckpt_plugins.lightning.reader import folder_of_manifest, read_lightning_checkpoint
from ckpt_plugins.lightning.saves import in_flight
from ckpt_plugins.restore.read import is_our_checkpoint
from ckpt_plugins.storage import open_storage

__all__ = ["install", "is_ours"]

log = logging.getLogger(__name__)

_installed = False


def is_ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds (or is being written as) one of our checkpoints."""
    path = folder_of_manifest(os.fspath(path))
    if path.startswith(("http://", "https://")):
        return False
    if in_flight(path) is not None:
        return True
    try:
        storage, root = open_storage(path)
        return is_single_file(storage, root) or is_reservation(storage, root) or is_our_checkpoint(storage, root)
    except (OSError, ValueError, ImportError):
        return False


def install() -> None:
    """Wrap Lightning's ``pl_load`` (idempotent; see the module docstring)."""
    global _installed
    if _installed:
        return
    import lightning.fabric.plugins.io.torch_io as torch_io
    import lightning.pytorch.core.saving as saving

    original = getattr(saving, "pl_load")  # noqa: B009 - not in its __all__

    @functools.wraps(original)
    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if isinstance(path_or_url, (str, Path)) and is_ours(path_or_url):
            return read_lightning_checkpoint(path_or_url, map_location=map_location)
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    for module in (saving, torch_io):
        setattr(module, "pl_load", pl_load)  # noqa: B010 - the name both modules call
    _installed = True
