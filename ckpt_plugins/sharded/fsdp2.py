"""Save and restore of a model sharded with FSDP2 (``fully_shard``) or tensor parallel, through
torch's state-dict API, for adapters whose framework holds such a model (the HF Trainer under
accelerate FSDP2, :mod:`ckpt_plugins.hf.fsdp`).

Every rank saves :func:`sharded_state` (``get_model_state_dict``/``get_optimizer_state_dict`` with
DTensor values) through the core's sharded path; :func:`restore_model` and
:func:`restore_optimizer` load one checkpoint folder's ``model`` / ``optimizer`` into a model and
optimizer in their own layout (FSDP2 at any world size, or plain modules). No collective.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ckpt_plugins.errors import CheckpointError
from ckpt_plugins.restore.read import restore_path
from ckpt_plugins.restore.select import Selector
from ckpt_plugins.restore.targets import RestoreReport

__all__ = ["is_sharded_checkpoint_folder", "is_sharded_model", "restore_model", "restore_optimizer", "sharded_state"]

log = logging.getLogger(__name__)


def is_sharded_model(model: Any) -> bool:
    """``model`` holds DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)."""
    from ckpt_plugins.sharded.layout import is_dtensor

    return model is not None and any(is_dtensor(p) for p in model.parameters())


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def sharded_state(model: torch.nn.Module, optimizer: Any, *, model_only: bool = False) -> dict[str, Any]:
    """What every rank saves for a sharded model: ``{"model": ..., "optimizer": ...}``, torch's
    ``get_model_state_dict``/``get_optimizer_state_dict`` with sharded (DTensor) values, the
    optimizer's keyed by parameter name. Call on every rank (no collective for FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=False, cpu_offload=False)
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None and not model_only:
        state["optimizer"] = get_optimizer_state_dict(model, _unwrap(optimizer), options=options)
    return state


def is_sharded_checkpoint_folder(path: str | os.PathLike[str] | None) -> bool:
    """``path`` is one of our checkpoint folders whose model was saved sharded (no weights file)."""
    if path is None:
        return False
    from ckpt_plugins.sharded.consolidate import is_sharded_checkpoint

    path = os.fspath(path)
    try:
        return is_sharded_checkpoint(path) and not os.path.exists(os.path.join(path, "model.safetensors"))
    except (OSError, ValueError, CheckpointError):  # damaged or foreign: the Trainer's own code decides
        return False


def _restore(path: str, key: str, target: Any, strict: bool) -> RestoreReport:
    _, report = restore_path(
        path,
        target={key: target},
        selector=Selector(include=(key,)),
        rename=None,
        strict=strict,
        map_location="cpu",
        allow_unsafe_pickle=False,
        verify=True,
    )
    log.info("restored %s from %s: %s", key, path, report.summary())
    return report


def restore_model(path: str | os.PathLike[str], model: torch.nn.Module, *, strict: bool = True) -> RestoreReport:
    """Load the model of the sharded checkpoint ``path`` into ``model``, in its own layout (FSDP2 at
    any world size, or a plain module). Call on every rank; no collective."""
    return _restore(os.fspath(path), "model", model, strict)


def restore_optimizer(path: str | os.PathLike[str], optimizer: Any, *, strict: bool = True) -> RestoreReport:
    """Load the optimizer state of the sharded checkpoint ``path`` into ``optimizer`` (matched to
    its parameters by position, its state read in their layout). A fresh optimizer is filled too."""
    return _restore(os.fspath(path), "optimizer", _unwrap(optimizer), strict)
