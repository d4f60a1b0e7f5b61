"""Hugging Face models: use their own activation checkpointing when it can express the mode.

A ``transformers.PreTrainedModel`` with ``supports_gradient_checkpointing`` checkpoints its
decoder layers itself (``GradientCheckpointingLayer``), with any keyword arguments for
:func:`torch.utils.checkpoint.checkpoint` and - since transformers 5 - ``every_n_layers``. Using it
keeps ``model.is_activation_checkpointing`` truthful for the Trainer and lets the model drop its
KV cache while training. It covers ``"full"``, ``"every_n"`` and ``"selective"`` (the policy goes
in as ``context_fn``) with ``targets="auto"``; ``"offload"`` (transformers' ``offload=True`` means
checkpointing *plus* offloading, a different trade) and explicit targets are wrapped instead.

Nothing here imports transformers: models are recognised by their attributes, so a PEFT model
(through ``get_base_model()``) and older transformers versions work too.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol, cast

from torch import nn

from ckpt_plugins.activation.targets import is_hf_layer

logger = logging.getLogger(__name__)


# nn.Module types unknown attributes as ``Tensor | Module``; these Protocols name what the
# Hugging Face (and PEFT) classes define, for use after the attribute checks below.
class _PeftModel(Protocol):
    def get_base_model(self) -> nn.Module: ...


class _PreTrainedModel(Protocol):
    def activation_checkpointing_enable(self, **kwargs: Any) -> None: ...  # transformers 5

    def gradient_checkpointing_enable(  # transformers 4
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None: ...


class _CheckpointingLayer(Protocol):  # transformers' GradientCheckpointingLayer
    gradient_checkpointing: bool


def find_hf_model(model: nn.Module) -> nn.Module | None:
    """The ``PreTrainedModel`` that supports checkpointing: ``model`` or a PEFT model's base."""
    candidates = [model]
    get_base_model = getattr(type(model), "get_base_model", None)
    if callable(get_base_model):
        candidates.append(cast(_PeftModel, model).get_base_model())
    for candidate in candidates:
        supports = getattr(type(candidate), "supports_gradient_checkpointing", None)
        if isinstance(supports, bool) and hasattr(candidate, "config") and _enable_fn(candidate):
            return candidate
    return None


def find_nested_hf_models(model: nn.Module) -> list[nn.Module]:
    """The outermost ``PreTrainedModel``s inside ``model`` (a LightningModule holding one, say)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if path and not any(path.startswith(f"{p}.") for p, _ in found) and _is_hf_model(module):
            found.append((path, module))
    return [module for _, module in found]


def _is_hf_model(module: nn.Module) -> bool:
    return find_hf_model(module) is module


def _enable_fn(hf_model: nn.Module) -> Any:
    return getattr(hf_model, "activation_checkpointing_enable", None) or getattr(
        hf_model, "gradient_checkpointing_enable", None
    )


def _disable_fn(hf_model: nn.Module) -> Any:
    return getattr(hf_model, "activation_checkpointing_disable", None) or getattr(
        hf_model, "gradient_checkpointing_disable", None
    )


def is_checkpointing(hf_model: nn.Module) -> bool:
    """Whether the model's own checkpointing is on (for any of its modules)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in hf_model.modules())


def can_enable(hf_model: nn.Module, hf_kwargs: dict[str, Any] | None) -> bool:
    """Whether the model's own mechanism can take ``hf_kwargs`` (``None``: the mode can't)."""
    if hf_kwargs is None or not getattr(type(hf_model), "supports_gradient_checkpointing", False):
        return False
    if not any(is_hf_layer(m) for m in hf_model.modules()):
        return False  # old-style models: no layer class to report or count every_n on
    if hasattr(hf_model, "activation_checkpointing_enable"):
        params = inspect.signature(cast(_PreTrainedModel, hf_model).activation_checkpointing_enable).parameters
        return hf_kwargs.get("every_n_layers", 1) == 1 or "every_n_layers" in params
    return hf_kwargs.get("every_n_layers", 1) == 1  # transformers 4: no every_n_layers


def enable(hf_model: nn.Module, hf_kwargs: dict[str, Any]) -> None:
    """Turn on the model's own checkpointing (``can_enable`` must be true)."""
    methods = cast(_PreTrainedModel, hf_model)
    if hasattr(hf_model, "activation_checkpointing_enable"):
        kwargs = dict(hf_kwargs)
        if kwargs.get("every_n_layers", 1) == 1:
            kwargs.pop("every_n_layers", None)
        methods.activation_checkpointing_enable(**kwargs)
    else:
        methods.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=hf_kwargs["activation_checkpointing_kwargs"]
        )


def disable(hf_model: nn.Module) -> None:
    """Turn the model's own checkpointing off."""
    _disable_fn(hf_model)()


def checkpointed_layers(hf_model: nn.Module) -> list[nn.Module]:
    """The layers the model's own mechanism checkpoints now, in module order."""
    return [
        m for m in hf_model.modules() if is_hf_layer(m) and cast(_CheckpointingLayer, m).gradient_checkpointing is True
    ]
