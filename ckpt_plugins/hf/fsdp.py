"""The Trainer under accelerate FSDP2 (``fully_shard``): every rank saves its own shards.

With ``TrainingArguments(fsdp=..., fsdp_config={"version": 2})`` on GPUs, accelerate wraps the
model with ``fully_shard``: its parameters are DTensors, and so is the optimizer's state. The
callback then saves, on every rank, the sharded ``get_model_state_dict`` /
``get_optimizer_state_dict`` (:func:`sharded_state`) through the core's sharded path (each rank
writes its chunks; manifest v3, docs/sharded.md) instead of the Trainer's ``model.safetensors``
and ``optimizer.pt``; the other Trainer files (``scheduler.pt``, ``rng_state_<rank>.pth``,
``trainer_state.json``, ``config.json``) are written beside them by rank 0 as usual.

On resume the Trainer would look for its own FSDP files (``pytorch_model_fsdp_0/``, a DCP folder)
and fail; :func:`install` wraps ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler`` and
``_load_best_model`` (``load_best_model_at_end``) on the Trainer instance, so that one of our
sharded ``checkpoint-N`` folders is restored into the Trainer's model and optimizer in their own
layout (:func:`restore_model`, :func:`restore_optimizer` of :mod:`ckpt_plugins.sharded.fsdp2`: each
rank reads only its boxes, at any world size, or in full into a plain model), and the scheduler
from ``scheduler.pt`` as the Trainer reads it. Other folders go to the Trainer's methods.
The callback installs this itself when the Trainer is built with it.

On CPU, accelerate ignores the FSDP plugin (``AcceleratorState`` sets ``DistributedType.FSDP``
only for GPU-like distributed types; ``MULTI_CPU`` stays DDP), so a CPU run with ``fsdp`` set
trains with DDP and the callback saves it as any DDP run (full tensors, rank 0).
"""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType
from typing import Any

import torch

from ckpt_plugins.sharded.fsdp2 import (
    is_sharded_checkpoint_folder,
    is_sharded_model,
    restore_model,
    restore_optimizer,
    sharded_state,
)

__all__ = [
    "find_trainer",
    "install",
    "is_sharded_checkpoint_folder",
    "is_sharded_model",
    "restore_model",
    "restore_optimizer",
    "sharded_state",
]

log = logging.getLogger(__name__)


def find_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is on the call stack (a callback's ``on_init_end``
    runs inside ``Trainer.__init__``); None when there is none."""
    from transformers import Trainer

    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def install(trainer: Any) -> None:
    """Let ``trainer`` resume from our sharded ``checkpoint-N`` folders (idempotent; see the module
    docstring). Folders of any other kind go to the Trainer's own methods unchanged."""
    if getattr(trainer, "_ckpt_plugins_fsdp", None) is not None:
        return
    load_model = trainer._load_from_checkpoint
    load_rest = trainer._load_optimizer_and_scheduler
    load_best = trainer._load_best_model

    def _load_from_checkpoint(resume_from_checkpoint: str, model: Any = None) -> Any:
        if not is_sharded_checkpoint_folder(resume_from_checkpoint):
            return load_model(resume_from_checkpoint, model)
        restore_model(resume_from_checkpoint, model if model is not None else trainer.model)
        return None

    def _load_optimizer_and_scheduler(checkpoint: str | None) -> Any:
        if not is_sharded_checkpoint_folder(checkpoint):
            return load_rest(checkpoint)
        assert checkpoint is not None
        restore_optimizer(checkpoint, trainer.optimizer)
        scheduler = os.path.join(checkpoint, "scheduler.pt")
        if trainer.lr_scheduler is not None and os.path.isfile(scheduler):
            trainer.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        return None

    def _load_best_model() -> Any:
        best = trainer.state.best_model_checkpoint
        if not is_sharded_checkpoint_folder(best):
            return load_best()
        log.info("loading the best model from %s (score: %s)", best, trainer.state.best_metric)
        restore_model(best, trainer.model)
        return None

    trainer._ckpt_plugins_fsdp = (load_model, load_rest, load_best)
    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    trainer._load_best_model = _load_best_model
