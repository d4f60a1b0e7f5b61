"""Activation (gradient) checkpointing from HF scripts, through the activation-checkpointing core.

transformers has two flags: ``--activation_checkpointing`` (``--gradient_checkpointing`` is its
deprecated alias) with ``--activation_checkpointing_kwargs`` (``every_n_layers``, ``offload`` and
arguments for ``torch.utils.checkpoint``). ``Trainer.train()`` turns them into one call of
``model.activation_checkpointing_enable(...)``, which raises for models without
``supports_gradient_checkpointing`` (and for plain ``nn.Module`` models, which have no such
method).

Our ``gradient_checkpointing`` option (flags ``--ckpt_gradient_checkpointing MODE``,
``--ckpt_gradient_checkpointing_every_n N``, ``--ckpt_gradient_checkpointing_targets PATTERNS``)
extends them. :func:`plan` decides, once, which of three things happens:

* ``"trainer"``: only transformers' flag is set and the model supports it: nothing to do, the
  Trainer enables the model's own checkpointing as usual;
* ``"ours"``: our option is set, or the flag is set for a model that cannot take it: the config
  goes to :func:`ckpt_plugins.activation.apply_activation_checkpointing` (which still uses the
  model's own mechanism when it can express the mode);
* ``"off"``: neither.

In the ``"ours"`` case the Trainer's flags are turned off after applying (with an info log), so
``train()`` neither applies its own default over ours nor raises for an unsupported model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ckpt_plugins.activation import (
    ActivationCheckpointing,
    ActivationCheckpointingReport,
    apply_activation_checkpointing,
)
from ckpt_plugins.activation import hf as hf_activation

__all__ = ["ActivationPlan", "apply_plan", "plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationPlan:
    """Who applies activation checkpointing, and with which config."""

    owner: Literal["trainer", "ours", "off"]
    config: ActivationCheckpointing | None
    reason: str


def _trainer_flag(args: Any) -> tuple[bool, dict[str, Any]]:
    on = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None
    )
    return on, dict(kwargs) if isinstance(kwargs, dict) else {}


def plan(option: bool | str | dict | ActivationCheckpointing | None, args: Any, model: nn.Module) -> ActivationPlan:
    """Decide who applies activation checkpointing (see the module docstring).

    Args:
        option: the callback's ``gradient_checkpointing`` (``None``: not set).
        args: the ``TrainingArguments``.
        model: the model the Trainer will train.

    Raises:
        ConfigError: ``option`` is not a valid activation-checkpointing value.
    """
    flag_on, flag_kwargs = _trainer_flag(args)
    ours = ActivationCheckpointing.from_value(option) if option is not None else None
    if ours is not None and ours.enabled:
        why = "--ckpt_gradient_checkpointing options given"
        return ActivationPlan("ours", ours, why + (" (they extend --activation_checkpointing)" if flag_on else ""))
    if not flag_on:
        return ActivationPlan("off", None, "not requested")
    every_n = int(flag_kwargs.get("every_n_layers", 1) or 1)
    derived = ActivationCheckpointing(mode="every_n", every_n=every_n) if every_n > 1 else ActivationCheckpointing()
    hf_model = hf_activation.find_hf_model(model)
    can_take = (
        hf_model is not None
        and hasattr(model, "activation_checkpointing_enable")
        and getattr(type(hf_model), "supports_gradient_checkpointing", False)
    )
    if can_take:
        return ActivationPlan("trainer", derived, "the model supports transformers' own activation checkpointing")
    if flag_kwargs.get("offload"):
        log.warning(
            "activation_checkpointing_kwargs offload=True is ignored for %s (no transformers "
            "support); use --ckpt_gradient_checkpointing offload to offload instead",
            type(model).__name__,
        )
    return ActivationPlan(
        "ours",
        derived,
        f"{type(model).__name__} has no transformers activation checkpointing support; applied by ckpt_plugins instead",
    )


def apply_plan(activation_plan: ActivationPlan, model: nn.Module, args: Any) -> ActivationCheckpointingReport | None:
    """Carry out ``activation_plan`` on ``model``; turn the Trainer's flags off when we applied it.

    Returns:
        The report when ckpt_plugins applied checkpointing, else None.
    """
    if activation_plan.owner != "ours" or activation_plan.config is None:
        return None
    report = apply_activation_checkpointing(model, activation_plan.config)
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        log.info(
            "activation checkpointing is applied by ckpt_plugins (%s); TrainingArguments."
            "activation_checkpointing is set to False so that Trainer.train() does not apply "
            "its own on top",
            activation_plan.reason,
        )
        args.activation_checkpointing = False
        if hasattr(args, "gradient_checkpointing"):
            args.gradient_checkpointing = False
    return report
