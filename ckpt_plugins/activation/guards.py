"""Checks that run when activation checkpointing is applied, and what each does about its problem.

* **BatchNorm inside a recomputed block** - the recompute runs BatchNorm's forward a second time
  in training mode, so ``running_mean``/``running_var`` are updated twice per step (the
  gradients stay correct: the recompute sees the same batch). Warned, naming the module; the
  fix is the user's (exclude the block, use LayerNorm/GroupNorm, or ``mode="offload"``).
* **``use_cache=True`` while training** - a Hugging Face model that fills a KV cache would fill
  it again during the recompute. ``model.config.use_cache`` is set to ``False`` (restored on
  removal) with a warning; a cache or ``use_cache=True`` passed explicitly to a wrapped block
  while training is dropped at call time (see :mod:`.wrapper`), also with a warning.
* **Frozen inputs (LoRA)** - with frozen embeddings the blocks' inputs do not require grad.
  *Reentrant* checkpointing then produces no gradients for the trainable parameters inside the
  block; the non-reentrant checkpointing used here (``use_reentrant=False``) does not have that
  problem. For a Hugging Face model we still call ``enable_input_require_grads()`` - its own
  ``activation_checkpointing_enable`` does the same - so both of our mechanisms leave the model in
  the state transformers and PEFT expect, and code elsewhere that uses reentrant checkpointing
  keeps working; it costs one extra input-gradient of the first block. It is undone on removal.
  For other models nothing is changed, and the report says why.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

from torch import nn

from ckpt_plugins.activation.targets import Block

logger = logging.getLogger(__name__)

Undo = Callable[[], None]
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ActivationCheckpointingWarning(UserWarning):
    """A guard of activation checkpointing found a problem or changed a setting.

    Filter it with ``warnings.filterwarnings("ignore", category=ActivationCheckpointingWarning)``.
    """


def warn(message: str) -> str:
    """Issue ``message`` as an :class:`ActivationCheckpointingWarning`; return it for the report.

    The warning is attributed to the first caller outside this package.
    """
    frame: FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, ActivationCheckpointingWarning, stacklevel=level)
    return message


def check_batchnorm(blocks: list[Block]) -> list[str]:
    """Warn about every BatchNorm (tracking running stats) inside a block that is recomputed."""
    notes = []
    for path, block in blocks:
        for sub, module in block.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                where = f"{path}.{sub}" if sub else path
                notes.append(
                    warn(
                        f"{type(module).__name__} {where!r} is inside checkpointed block {path!r}: in "
                        "training mode its running_mean/running_var are updated twice per step (in "
                        "forward and again when the block is recomputed), so they drift from what "
                        "training without checkpointing gives (gradients are unaffected). Exclude the "
                        "block from `targets`, use LayerNorm/GroupNorm, or use mode='offload', which "
                        "does not recompute."
                    )
                )
    return notes


def disable_use_cache(hf_model: nn.Module) -> tuple[list[str], list[Undo]]:
    """Set ``hf_model.config.use_cache = False`` (with a warning) when it is true."""
    config = getattr(hf_model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        return [], []
    config.use_cache = False

    def undo() -> None:
        config.use_cache = True

    note = warn(
        f"{type(hf_model).__name__}.config.use_cache was True; set it to False because a KV "
        "cache filled while training would be filled again when checkpointed blocks are "
        "recomputed. It is restored by remove_activation_checkpointing(); pass use_cache=True to "
        "generate() when you need the cache at inference."
    )
    return [note], [undo]


def _method(module: nn.Module, name: str) -> Callable[..., Any]:
    """A method a Hugging Face model defines (``nn.Module.__getattr__`` is typed for tensors)."""
    method: Callable[..., Any] = getattr(module, name)
    return method


def input_embeddings(model: nn.Module, hf_model: nn.Module | None) -> nn.Module | None:
    """The module that produces the blocks' inputs from token ids, if there is one."""
    if hf_model is not None and hasattr(hf_model, "get_input_embeddings"):
        try:
            embeddings: nn.Module | None = _method(hf_model, "get_input_embeddings")()
            return embeddings
        except NotImplementedError:
            pass
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def has_frozen_inputs(model: nn.Module, hf_model: nn.Module | None, blocks: list[Block]) -> bool:
    """True when the input embeddings are frozen while some block parameter is trainable."""
    embeddings = input_embeddings(model, hf_model)
    if embeddings is None:
        return False
    frozen = not any(p.requires_grad for p in embeddings.parameters())
    trainable = any(p.requires_grad for _, b in blocks for p in b.parameters())
    return frozen and trainable


def _has_input_grad_hooks(hf_model: nn.Module) -> bool:
    return bool(getattr(hf_model, "_require_grads_hooks", None) or getattr(hf_model, "_require_grads_hook", None))


def keep_input_grad_hooks_as_before(hf_model: nn.Module) -> list[Undo]:
    """Undo for enabling HF checkpointing: remove input-grad hooks it adds if none were there."""
    if _has_input_grad_hooks(hf_model) or not hasattr(hf_model, "disable_input_require_grads"):
        return []
    return [_method(hf_model, "disable_input_require_grads")]


def handle_frozen_inputs(
    model: nn.Module, hf_model: nn.Module | None, blocks: list[Block]
) -> tuple[list[str], list[Undo]]:
    """The frozen-inputs guard for the wrapping mechanism (see the module docstring)."""
    if not has_frozen_inputs(model, hf_model, blocks):
        return [], []
    if hf_model is None or not hasattr(hf_model, "enable_input_require_grads"):
        note = (
            "the input embeddings are frozen (LoRA-style); nothing changed: the "
            "non-reentrant checkpointing used here (use_reentrant=False) computes gradients "
            "for trainable parameters inside blocks whose inputs do not require grad."
        )
        logger.info(note)
        return [note], []
    if _has_input_grad_hooks(hf_model):
        return [], []
    _method(hf_model, "enable_input_require_grads")()
    note = warn(
        f"the input embeddings of {type(hf_model).__name__} are frozen (LoRA-style); called "
        "enable_input_require_grads() so the blocks' inputs require grad, as transformers does "
        "when it checkpoints. Not needed for correct gradients with use_reentrant=False (always "
        "used here), but keeps any reentrant checkpointing elsewhere working. Undone by "
        "remove_activation_checkpointing()."
    )
    return [note], [_method(hf_model, "disable_input_require_grads")]
