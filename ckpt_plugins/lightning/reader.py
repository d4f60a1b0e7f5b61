"""Read a checkpoint as the dict Lightning loads: one of our folders, or a Lightning ``.ckpt``.

Our folders hold the checkpoint dict as the ``state`` part (see :mod:`.state`) and, per rank, a
``rank_<r>`` part with that rank's RNG and data position; the rank part of the calling rank is
added under :data:`~ckpt_plugins.lightning.state.RANK_STATE_KEY`. ``.ckpt`` files (and other
torch files) go through the core's foreign readers: torch's ``weights_only`` loader plus a short
list of data-only types, never full pickle unless the caller opts in.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ckpt_plugins.distributed import rank_and_world
from ckpt_plugins.errors import CheckpointNotFoundError
from ckpt_plugins.formats import read_foreign
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.restore.read import is_our_checkpoint, restore_ours, restore_path
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.layout.naming import parse_step_dir
from ckpt_plugins.storage import open_storage

from ckpt_plugins.lightning.state import RANK_STATE_KEY

__all__ = ["read_lightning_checkpoint"]

log = logging.getLogger(__name__)


def read_lightning_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu",
                              allow_unsafe_pickle: bool = False, verify: bool = True, rank: int | None = None,
                              managers: list[CheckpointManager] | None = None) -> dict[str, Any]:
    """The Lightning checkpoint dict stored at ``path``.

    Args:
        path: one of our checkpoint folders, or a ``.ckpt``/``.pt`` file.
        map_location: where tensors go (a device or string; anything else means ``"cpu"``).
        allow_unsafe_pickle: full pickle for foreign files (trusted files only).
        verify: check our folders' checksums.
        rank: whose rank part to add (default: this process's rank).
        managers: live managers (a callback's); a folder of theirs is restored through its
            manager, which then protects it from retention as the resumed-from checkpoint.

    Returns:
        The checkpoint dict, with :data:`RANK_STATE_KEY` when the folder has this rank's part.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: a foreign file needs full pickle and it was not allowed.
    """
    path = os.fspath(path)
    location = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    rank = rank_and_world()[0] if rank is None else rank
    storage, root = open_storage(path)
    if not storage.exists(root):
        raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
    if not is_our_checkpoint(storage, root):
        checkpoint = read_foreign(path, map_location=location, allow_unsafe_pickle=allow_unsafe_pickle)
        if not isinstance(checkpoint, dict):
            raise CheckpointNotFoundError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
        return checkpoint
    manager, step = _owner(root, managers or [])
    if manager is not None and step is not None:
        checkpoint = dict(manager.restore(step, map_location=location))
        rank_state = manager.restore_rank_state(step, rank=rank, map_location=location)
    else:
        state, report = restore_path(path, target=None, selector=None, rename=None, strict=True,
                                     map_location=location, allow_unsafe_pickle=False, verify=verify)
        log.info(report.summary())
        checkpoint = dict(state)
        parent = os.path.dirname(root.rstrip("/")) or root
        rank_state, _ = restore_ours(storage, Layout(storage, parent), root, target=None, selector=None,
                                     rename=None, strict=True, map_location=location,
                                     allow_unsafe_pickle=False, verify=verify, part=f"rank_{rank}",
                                     missing_ok=True)
    if rank_state is not None:
        checkpoint[RANK_STATE_KEY] = rank_state
    return checkpoint


def _owner(root: str, managers: list[CheckpointManager]) -> tuple[CheckpointManager | None, int | None]:
    parent, name = os.path.split(os.path.abspath(root.rstrip("/")))
    for manager in managers:
        if os.path.abspath(manager.directory) == parent:
            step = parse_step_dir(name, manager.layout.prefix)
            if step is not None:
                return manager, step
    return None, None
