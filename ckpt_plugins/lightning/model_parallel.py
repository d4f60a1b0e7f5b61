"""Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel) and ``FSDPStrategy`` (FSDP1)
resume from our sharded checkpoints.

Both strategies' ``load_checkpoint`` read DCP folders or one torch file by themselves, bypassing
the CheckpointIO plugin and ``pl_load``, and their ``load_model_state_dict``/
``load_optimizer_state_dict`` do nothing (the loading happened there). :func:`install` wraps
``load_checkpoint`` on the strategy instance: one of our checkpoint folders is restored into the
strategy's own module and optimizers, in their own layout (each rank reads only its shards, any
world size or mesh), and the rest of the checkpoint dict (loops, callbacks, schedulers, this
rank's RNG and data position) is returned for Lightning to restore as usual. Any other path goes
to Lightning's method unchanged.

``FSDPStrategy(state_dict_type="sharded")`` saves ``ShardedTensor`` state dicts (the module's
under FSDP's sharded state dict type, the optimizers' from ``FSDP.optim_state_dict``); they are
stored like DTensors, and restored through :mod:`ckpt_plugins.sharded.fsdp1`'s targets with the
strategy's own state-dict context. ``state_dict_type="full"`` is refused at set-up: its load path
reads only torch files.
"""

from __future__ import annotations

import logging
from typing import Any

from ckpt_plugins.errors import ConfigError

__all__ = ["install", "needs_install", "restore_target"]

log = logging.getLogger(__name__)


def _is(strategy: Any, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(strategy).__mro__)


def needs_install(strategy: Any) -> bool:
    """``strategy`` loads checkpoints without the CheckpointIO plugin (ModelParallel, FSDP)."""
    return _is(strategy, "ModelParallelStrategy") or _is(strategy, "FSDPStrategy")


def restore_target(strategy: Any) -> dict[str, Any]:
    """What our folder is restored into: the module and optimizers, in the strategy's layout."""
    if _is(strategy, "FSDPStrategy"):
        from ckpt_plugins.sharded.fsdp1 import ShardedModule, ShardedOptimizer

        context = _fsdp_context()
        strict = strategy.lightning_module.strict_loading
        return {
            "state_dict": ShardedModule(strategy.model, strict=strict, context=context),
            "optimizer_states": [ShardedOptimizer(strategy.model, o, context=context) for o in strategy.optimizers],
        }
    return {"state_dict": strategy.lightning_module, "optimizer_states": list(strategy.optimizers)}


def _fsdp_context() -> Any:
    """Lightning's own sharded state-dict context (the one its saves run under)."""
    from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context

    return _get_sharded_state_dict_context


def install(strategy: Any) -> None:
    """Wrap ``strategy.load_checkpoint`` (idempotent; see the module docstring).

    Raises:
        ConfigError: ``FSDPStrategy(state_dict_type="full")``, whose saves and loads go through
            torch files only.
    """
    if getattr(strategy, "_ckpt_plugins_load", None) is not None:
        return
    if _is(strategy, "FSDPStrategy") and getattr(strategy, "_state_dict_type", "sharded") != "sharded":
        raise ConfigError(
            "CheckpointCallback with FSDPStrategy needs state_dict_type='sharded' (every rank saves "
            f"its shards); got state_dict_type={strategy._state_dict_type!r}, which Lightning loads "
            "from torch files only. Pass FSDPStrategy(state_dict_type='sharded')"
        )
    from ckpt_plugins.lightning.load_hook import is_ours
    from ckpt_plugins.lightning.reader import read_lightning_checkpoint

    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = strategy.broadcast(checkpoint_path)
        if not is_ours(path):
            return dict(original(path, weights_only=weights_only))
        module = strategy.lightning_module
        target = restore_target(strategy)
        log.info("restoring %s into the sharded module and %d optimizer(s)", path, len(strategy.optimizers))
        return read_lightning_checkpoint(path, target=target, strict=module.strict_loading)

    strategy._ckpt_plugins_load = original
    strategy.load_checkpoint = load_checkpoint
