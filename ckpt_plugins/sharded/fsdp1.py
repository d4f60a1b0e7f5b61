"""Restore targets for FSDP1 (``FullyShardedDataParallel``) models and optimizers, sharded.

FSDP1's ``SHARDED_STATE_DICT`` holds ``ShardedTensor``s: the model's under
``FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT)``, the optimizer's from
``FSDP.optim_state_dict(model, opt)`` (keyed by parameter name). They are saved like DTensors
(each rank writes its local shards as chunks of the manifest's ``sharded`` section), so such a
checkpoint restores into any layout. Restoring *into* FSDP1 needs these two targets, because an
FSDP1 module's own ``state_dict()`` is its flat parameters unless the state dict type is set, and
its optimizer holds flat parameters: :class:`ShardedModule` and :class:`ShardedOptimizer` read,
on each rank, only the boxes of its own local shards, build ShardedTensors with the target's
metadata (no collective), and load them through FSDP's own ``load_state_dict`` /
``FSDP.optim_state_dict_to_load``. Pass them as ``restore(target=...)``, e.g.
``{"model": ShardedModule(fsdp), "optimizer": ShardedOptimizer(fsdp, opt)}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ckpt_plugins.sharded.read import ShardedRef, resolve_like

__all__ = ["ShardedModule", "ShardedOptimizer", "is_fsdp1", "sharded_state_dict_type"]

log = logging.getLogger(__name__)

Context = Callable[[torch.nn.Module], contextlib.AbstractContextManager[Any]]


def is_fsdp1(model: Any) -> bool:
    """``model`` is (or holds) an FSDP1 ``FullyShardedDataParallel`` module."""
    import sys

    module = sys.modules.get("torch.distributed.fsdp")
    return module is not None and any(isinstance(m, module.FullyShardedDataParallel) for m in model.modules())


@contextlib.contextmanager
def sharded_state_dict_type(model: torch.nn.Module) -> Iterator[None]:
    """``FSDP.state_dict_type(model, SHARDED_STATE_DICT)``: state dicts of ShardedTensors."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    with FSDP.state_dict_type(
        model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(), ShardedOptimStateDictConfig()
    ):
        yield


class ShardedModule:
    """An FSDP1 model as a restore target: its sharded state dict, read and loaded shard by shard.

    Args:
        model: the FSDP1-wrapped model (the root ``FullyShardedDataParallel``).
        strict: passed to the model's ``load_state_dict``.
        context: the state-dict context (default :func:`sharded_state_dict_type`; Lightning's
            FSDPStrategy passes its own, which offloads to CPU).
    """

    def __init__(self, model: torch.nn.Module, *, strict: bool = True, context: Context | None = None) -> None:
        self.model, self.strict = model, strict
        self.context: Context = context or sharded_state_dict_type

    def state_dict(self) -> dict[str, Any]:
        with self.context(self.model):
            return dict(self.model.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``state`` (ShardedRefs, full plain tensors or ShardedTensors by name); the refs
        in ``state`` are replaced by what was read, so the caller's state does not read them again."""
        with self.context(self.model):
            own = self.model.state_dict()
            for key in list(state):
                if key in own:
                    state[key] = resolve_like(state[key], own[key])
            self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=self.strict)


class ShardedOptimizer:
    """An optimizer of an FSDP1 model as a restore target, for a state saved as
    ``FSDP.optim_state_dict(model, opt)`` under the sharded state dict type (parameter names,
    ShardedTensor state). Each state tensor of a parameter's shape is read in the layout of that
    parameter's ShardedTensor (FSDP1 shards both alike, along dimension 0); scalars (``step``) as
    they are. A freshly built optimizer (no step taken) is filled too."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, *, context: Context | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.context: Context = context or sharded_state_dict_type

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with self.context(self.model):
            return dict(FSDP.optim_state_dict(self.model, self.optimizer))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with self.context(self.model):
            params = self.model.state_dict()
            for fqn, entry in state.get("state", {}).items():
                if not isinstance(entry, dict):
                    continue
                template = params.get(fqn)
                for name, value in entry.items():
                    if not isinstance(value, (torch.Tensor, ShardedRef)):
                        continue
                    if template is not None and tuple(value.shape) == tuple(template.shape):
                        entry[name] = resolve_like(value, template)
                    elif isinstance(value, ShardedRef):
                        entry[name] = value.full()
            flat = FSDP.optim_state_dict_to_load(self.model, self.optimizer, _plain(state))
            self.optimizer.load_state_dict(flat)


def _plain(state: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer state dict as ``optim_state_dict_to_load`` reads it: param groups as dicts
    with list ``params`` (a restore returns tuples where the saved state had them)."""
    groups = [dict(g, params=list(g["params"])) for g in state.get("param_groups", [])]
    return {"state": dict(state.get("state", {})), "param_groups": groups}
