"""Apply and remove activation checkpointing.

``apply_activation_checkpointing`` converts the config once, finds the blocks, runs the guards,
then takes one of two mechanisms - the Hugging Face model's own (see :mod:`.hf`) or a
``forward`` replacement per block (see :mod:`.wrapper`) - and records on the model what it did
and how to undo it. The record makes a second application with the same config a no-op and lets
``remove_activation_checkpointing`` restore the model exactly (forwards, ``use_cache``, input
hooks). Neither mechanism changes parameter names or state_dict keys.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckpt_plugins.activation import guards, hf
from ckpt_plugins.activation.config import ActivationCheckpointing
from ckpt_plugins.activation.modes import CheckpointMode, build_mode
from ckpt_plugins.activation.report import ActivationCheckpointingReport, Mechanism, WrappedModule
from ckpt_plugins.activation.targets import Block, find_blocks
from ckpt_plugins.activation.wrapper import wrap, wrapped_by
from ckpt_plugins.errors import ConfigError

logger = logging.getLogger(__name__)

_STATE_ATTR = "_ckpt_plugins_activation"


@dataclass
class _Applied:
    config: ActivationCheckpointing
    report: ActivationCheckpointingReport
    undo: list[Callable[[], None]] = field(default_factory=list)


def apply_activation_checkpointing(
    model: nn.Module,
    config: bool | str | dict[str, Any] | ActivationCheckpointing | None = True,
) -> ActivationCheckpointingReport:
    """Checkpoint (or offload) the blocks of ``model`` in place.

    Args:
        model: any ``nn.Module``; a ``transformers.PreTrainedModel`` (or a PEFT model around one)
            uses its own mechanism when it can express the mode.
        config: an :class:`ActivationCheckpointing`, or anything
            :meth:`ActivationCheckpointing.from_value` accepts (``True``, ``"selective"``,
            ``{"mode": "every_n", "every_n": 2}``, ...).

    Returns:
        What was done: the mechanism, each wrapped module and how, and the guards' notes.
        Applying the same config again returns the first report with ``already_applied=True``.

    Raises:
        ConfigError: the config is invalid, the targets match nothing, or the model already has
            activation checkpointing applied with a different config.

    Warns:
        ActivationCheckpointingWarning: BatchNorm inside a recomputed block; ``use_cache`` turned
            off; inputs made to require grad for a frozen-embedding (LoRA) model.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        ...                               for _ in range(4)])
        >>> report = apply_activation_checkpointing(model, {"mode": "every_n", "every_n": 2})
        >>> [w.path for w in report.wrapped]
        ['0', '2']
        >>> remove_activation_checkpointing(model)
        True
    """
    cfg = ActivationCheckpointing.from_value(config)
    applied: _Applied | None = getattr(model, _STATE_ATTR, None)
    if applied is not None:
        if applied.config == cfg:
            logger.info("activation checkpointing already applied to %s with this config", type(model).__name__)
            return dataclasses.replace(applied.report, already_applied=True)
        raise ConfigError(
            f"activation checkpointing is already applied to {type(model).__name__} with "
            f"{applied.config}; call remove_activation_checkpointing(model) before applying {cfg}."
        )
    if not cfg.enabled:
        return ActivationCheckpointingReport(mode="off", mechanism="none")

    mode = build_mode(cfg)
    hf_model = hf.find_hf_model(model)
    blocks = find_blocks(model, cfg.target_patterns())
    selected = [b for i, b in enumerate(blocks) if mode.selects(i)]
    skipped = tuple(path for i, (path, _) in enumerate(blocks) if not mode.selects(i))

    notes: list[str] = []
    undo: list[Callable[[], None]] = []
    try:
        mechanism, wrapped = _apply(model, cfg, mode, hf_model, selected, notes, undo)
    except BaseException:
        for step in reversed(undo):  # leave the model as it was
            step()
        raise

    report = ActivationCheckpointingReport(
        mode=cfg.mode,
        mechanism=mechanism,
        wrapped=tuple(wrapped),
        skipped=skipped,
        notes=tuple(notes),
    )
    setattr(model, _STATE_ATTR, _Applied(cfg, report, undo))
    logger.info("%s", report)
    return report


def remove_activation_checkpointing(model: nn.Module) -> bool:
    """Undo :func:`apply_activation_checkpointing` on ``model``.

    Restores the blocks' original ``forward`` (or turns the Hugging Face mechanism off),
    ``config.use_cache`` and the input-grad hooks.

    Returns:
        True when something was removed, False when it was not applied.
    """
    applied: _Applied | None = getattr(model, _STATE_ATTR, None)
    if applied is None:
        return False
    for step in reversed(applied.undo):
        step()
    delattr(model, _STATE_ATTR)
    logger.info("activation checkpointing removed from %s", type(model).__name__)
    return True


def activation_checkpointing_report(model: nn.Module) -> ActivationCheckpointingReport | None:
    """The report of the activation checkpointing applied to ``model``, or None."""
    applied: _Applied | None = getattr(model, _STATE_ATTR, None)
    return None if applied is None else applied.report


def _apply(
    model: nn.Module,
    cfg: ActivationCheckpointing,
    mode: CheckpointMode,
    hf_model: nn.Module | None,
    selected: list[Block],
    notes: list[str],
    undo: list[Callable[[], None]],
) -> tuple[Mechanism, list[WrappedModule]]:
    """Run the guards and one mechanism; append notes and undo steps as changes are made."""
    if mode.recomputes:
        notes += guards.check_batchnorm(selected)
        # The model itself, or the Hugging Face models inside it (a LightningModule around one).
        for cached in [hf_model] if hf_model is not None else hf.find_nested_hf_models(model):
            cache_notes, cache_undo = guards.disable_use_cache(cached)
            notes += cache_notes
            undo += cache_undo

    hf_kwargs = mode.hf_kwargs()
    mechanism: Mechanism
    if (
        hf_model is not None
        and cfg.target_patterns() is None
        and hf_kwargs is not None
        and hf.can_enable(hf_model, hf_kwargs)
    ):
        wrapped = _enable_hf(model, hf_model, mode, hf_kwargs, undo)
        mechanism = "hf"
        if guards.has_frozen_inputs(model, hf_model, selected):
            notes.append(
                "the input embeddings are frozen (LoRA-style); transformers' own "
                "mechanism made their outputs require grad (enable_input_require_grads)"
            )
    else:
        if hf_model is not None and hf.is_checkpointing(hf_model):
            hf.disable(hf_model)
            notes.append(
                "the model's own (transformers) activation checkpointing was on; turned "
                "it off so blocks are not checkpointed twice"
            )
        if mode.recomputes:
            frozen_notes, frozen_undo = guards.handle_frozen_inputs(model, hf_model, selected)
            notes += frozen_notes
            undo += frozen_undo
        wrapped = _wrap_blocks(selected, mode, notes, undo)
        mechanism = "wrap"

    if cfg.mode == "offload" and not _accelerator_in_use(model):
        notes.append(
            "offload on a CPU-only model: saved tensors already live in host memory, so "
            "this mode changes nothing (no memory saved, no time lost)"
        )
    return mechanism, wrapped


def _enable_hf(
    model: nn.Module,
    hf_model: nn.Module,
    mode: CheckpointMode,
    hf_kwargs: dict[str, Any],
    undo: list[Callable[[], None]],
) -> list[WrappedModule]:
    undo_hooks = guards.keep_input_grad_hooks_as_before(hf_model)
    hf.enable(hf_model, hf_kwargs)
    undo.append(lambda: hf.disable(hf_model))
    undo += undo_hooks
    paths = {id(m): p for p, m in model.named_modules()}
    how = f"transformers activation_checkpointing_enable: {mode.describe()}"
    return [WrappedModule(paths[id(m)], type(m).__name__, how) for m in hf.checkpointed_layers(hf_model)]


def _wrap_blocks(
    blocks: list[Block], mode: CheckpointMode, notes: list[str], undo: list[Callable[[], None]]
) -> list[WrappedModule]:
    wrapped = []
    for path, block in blocks:
        if wrapped_by(block) is not None:
            notes.append(f"{path!r} was already wrapped by another application; left as it is")
            continue
        undo.append(wrap(block, mode).restore)
        wrapped.append(WrappedModule(path, type(block).__name__, mode.describe()))
    return wrapped


def _accelerator_in_use(model: nn.Module) -> bool:
    if any(p.device.type != "cpu" for p in model.parameters()):
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
