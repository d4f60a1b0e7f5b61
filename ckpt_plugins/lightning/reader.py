"""Read a checkpoint as the dict Lightning loads: our single file, one of our folders, or a ``.ckpt``.

* A single file (what :class:`~ckpt_plugins.lightning.CheckpointIOPlugin` writes,
  :mod:`ckpt_plugins.files.single_file`) holds the checkpoint dict. A save of that path still in
  flight in this process is waited for first.
* A folder (what :class:`~ckpt_plugins.lightning.CheckpointCallback` writes) holds the dict as its
  ``state`` part and, per rank, a ``rank_<r>`` part with that rank's RNG and data position; the
  calling rank's part is added under :data:`~ckpt_plugins.lightning.state.RANK_STATE_KEY`. A
  folder of a live callback's manager (:func:`register_manager`) is restored through that
  manager, which then protects it from retention as the resumed-from checkpoint.
* ``.ckpt`` files (and other torch files) go through the core's foreign readers: torch's
  ``weights_only`` loader plus a short list of data-only types, never full pickle unless the
  caller opts in.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ckpt_plugins.distributed import rank_and_world
from ckpt_plugins.errors import CheckpointNotFoundError
from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.files.single_file import is_reservation, is_single_file, read_single_file
from ckpt_plugins.formats import read_foreign
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.lightning.saves import wait_for
from ckpt_plugins.lightning.state import RANK_STATE_KEY
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.restore.read import is_our_checkpoint, read_rank_state, restore_path
from ckpt_plugins.storage import open_storage

__all__ = ["folder_of_manifest", "read_lightning_checkpoint", "register_manager", "unregister_manager"]

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


def register_manager(manager: CheckpointManager) -> None:
    """Restore ``manager``'s folders through it (a callback's, while it trains)."""
    _LIVE.add(manager)


def unregister_manager(manager: CheckpointManager) -> None:
    _LIVE.discard(manager)


def read_lightning_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    allow_unsafe_pickle: bool = False,
    verify: bool = True,
    rank: int | None = None,
    managers: list[CheckpointManager] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    target: Any = None,
    strict: bool = True,
) -> dict[str, Any]:
    """The Lightning checkpoint dict stored at ``path``.

    Args:
        path: one of our single files or checkpoint folders, or a ``.ckpt``/``.pt`` file.
        map_location: where tensors go (a device or string; anything else means ``"cpu"``).
        allow_unsafe_pickle: full pickle for foreign files (trusted files only).
        verify: check our folders' checksums.
        rank: whose rank part to add (default: this process's rank).
        managers: live managers whose folders are restored through them (default: those
            registered with :func:`register_manager`).
        storage_options: for a URL ``path`` not under a live manager: its fsspec options.
        target, strict: of our folders, what to restore into in place (``restore(target=...)``:
            a sharded module and its optimizers are read in their own layout).

    Returns:
        The checkpoint dict, with :data:`RANK_STATE_KEY` when the folder has this rank's part.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsafeCheckpointError: a foreign file needs full pickle and it was not allowed.
    """
    path = folder_of_manifest(os.fspath(path))
    location = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    rank = rank_and_world()[0] if rank is None else rank
    wait_for(path)
    manager, step = _owner(path, managers or list(_LIVE))
    if manager is not None and (step is None or step in manager.steps()):  # its tiers and storage options
        return _through(manager, step, rank, location, target, strict)
    storage, root = open_storage(path, storage_options)
    if not storage.exists(root):
        raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
    if is_single_file(storage, root) or is_reservation(storage, root):
        state, _ = read_single_file(storage, root, map_location=location, verify=verify)
        return dict(state)
    if not is_our_checkpoint(storage, root):
        checkpoint = read_foreign(path, map_location=location, allow_unsafe_pickle=allow_unsafe_pickle)
        if not isinstance(checkpoint, dict):
            raise CheckpointNotFoundError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
        return checkpoint
    state, report = restore_path(
        path,
        target=target,
        selector=None,
        rename=None,
        strict=strict,
        map_location=location,
        allow_unsafe_pickle=False,
        verify=verify,
        storage_options=storage_options,
    )
    log.info(report.summary())
    checkpoint = dict(state)
    parent = os.path.dirname(root.rstrip("/")) or root
    rank_state = read_rank_state(storage, Layout(storage, parent), root, rank, verify=verify, map_location=location)
    if rank_state is not None:
        checkpoint[RANK_STATE_KEY] = rank_state
    return checkpoint


def _through(
    manager: CheckpointManager, step: int | None, rank: int, location: Any, target: Any = None, strict: bool = True
) -> dict[str, Any]:
    """Restore through a live manager: a committed step, or (None) its in-memory snapshot, whose
    step every rank agrees on."""
    if step is None:
        checkpoint = dict(manager.restore("latest", map_location=location, target=target, strict=strict))
        restored = manager.restored_step
        rank_state = (
            None if restored is None else manager.restore_rank_state(restored, rank=rank, map_location=location)
        )
    else:
        checkpoint = dict(manager.restore(step, map_location=location, target=target, strict=strict))
        rank_state = manager.restore_rank_state(step, rank=rank, map_location=location)
    if rank_state is not None:
        checkpoint[RANK_STATE_KEY] = rank_state
    return checkpoint


def folder_of_manifest(path: str) -> str:
    """``<url>/step_N/manifest.json`` -> ``<url>/step_N``: what ``ckpt_path="last"`` resolves to on an
    object store (Lightning needs an object with a modification time; a prefix has none)."""
    suffix = "/" + MANIFEST_NAME
    return path[: -len(suffix)] if "://" in path and path.endswith(suffix) else path


def _owner(path: str, managers: list[CheckpointManager]) -> tuple[CheckpointManager | None, int | None]:
    """The live manager whose directory (or in-memory tier: step None) holds the checkpoint ``path``."""
    url = "://" in path
    if url:
        root = path.rstrip("/")
        parent, _, name = root.rpartition("/")
    else:
        root = os.path.abspath(path.rstrip("/"))
        parent, name = os.path.split(root)
    for manager in managers:
        if not url and manager.is_memory_snapshot(root):  # restored through the manager's tier: (manager, None)
            return manager, None
        mine = {manager.directory.rstrip("/") if url else os.path.abspath(manager.directory)}
        if not url and manager.mirror is not None:
            mine.add(os.path.abspath(manager.root))  # the local copies of a mirror
        if parent in mine:
            step = manager.layout.step_of(name)
            if step is not None:
                return manager, step
    return None, None
