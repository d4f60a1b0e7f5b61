"""The forward replacement that checkpoints one block without renaming anything.

torch's ``checkpoint_wrapper`` puts the block inside a new module, which inserts
``_checkpoint_wrapped_module.`` into every parameter name and state_dict key (and needs a
state-dict hook to hide it again). Here the block stays where it is; only its ``forward``
attribute is replaced by a :class:`CheckpointedForward` - a plain callable, not a module, so
``named_parameters()`` and ``state_dict()`` are exactly as before and checkpoints load with and
without activation checkpointing.

``nn.Module.__call__`` calls ``self.forward``, so the module's own hooks (forward pre/post hooks,
DDP's, FSDP2's) stay *outside* the checkpoint and run once, as transformers does for its layers.
The replacement holds strong references to the module and its original forward, so
``copy.deepcopy`` of a wrapped model gives a copy whose blocks call their own forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ckpt_plugins.activation.guards import warn
from ckpt_plugins.activation.modes import CheckpointMode

logger = logging.getLogger(__name__)

_CACHE_FLAGS = ("use_cache",)


def _is_kv_cache(value: Any) -> bool:
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


class CheckpointedForward:
    """Stands in for ``module.forward`` and runs the original through a :class:`CheckpointMode`.

    Without grad (``torch.no_grad()``, inference) the original forward runs directly.
    """

    def __init__(self, module: nn.Module, mode: CheckpointMode) -> None:
        self.module = module
        self.mode = mode
        self.had_instance_forward = "forward" in module.__dict__
        self.original = module.forward
        self._warned_cache = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        if self.mode.recomputes and self.module.training:
            args, kwargs = self._drop_kv_cache(args, kwargs)
        return self.mode.run(self.module, self.original, args, kwargs)

    def _drop_kv_cache(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The runtime half of the ``use_cache`` guard: a recomputed block must not fill a cache."""
        dropped = [k for k in _CACHE_FLAGS if kwargs.get(k)]
        dropped += [k for k, v in kwargs.items() if _is_kv_cache(v)]
        cache_positions = [i for i, a in enumerate(args) if _is_kv_cache(a)]
        if not dropped and not cache_positions:
            return args, kwargs
        kwargs = {k: (False if k in _CACHE_FLAGS else None) if k in dropped else v for k, v in kwargs.items()}
        args = tuple(None if i in cache_positions else a for i, a in enumerate(args))
        if not self._warned_cache:
            self._warned_cache = True
            warn(
                f"{type(self.module).__name__} is checkpointed and training, but was called with "
                "a KV cache or use_cache=True; dropped them for this call (a recomputed block "
                "would fill the cache twice). Call the model with use_cache=False when training."
            )
        return args, kwargs

    def restore(self) -> None:
        """Put the module's original ``forward`` back."""
        if self.module.__dict__.get("forward") is not self:
            logger.warning(
                "forward of %s was replaced after activation checkpointing was applied; leaving it as it is",
                type(self.module).__name__,
            )
            return
        if self.had_instance_forward:
            self.module.forward = self.original
        else:
            del self.module.__dict__["forward"]


def wrap(module: nn.Module, mode: CheckpointMode) -> CheckpointedForward:
    """Replace ``module.forward`` with a :class:`CheckpointedForward`; return it."""
    replacement = CheckpointedForward(module, mode)
    module.forward = replacement
    return replacement


def wrapped_by(module: nn.Module) -> CheckpointedForward | None:
    """The :class:`CheckpointedForward` installed on ``module``, if any."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, CheckpointedForward) else None
