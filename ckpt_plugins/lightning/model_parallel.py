"""Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel) resumes from our sharded checkpoints.

That strategy's ``load_checkpoint`` reads DCP folders or one torch file by itself, bypassing the
CheckpointIO plugin and ``pl_load``, and its ``load_model_state_dict``/``load_optimizer_state_dict``
do nothing (the loading happened there). :func:`install` wraps ``load_checkpoint`` on the strategy
instance: one of our checkpoint folders is restored into the strategy's own module and
optimizers, in their own layout (each rank reads only its shards, any world size or mesh), and the
rest of the checkpoint dict (loops, callbacks, schedulers, this rank's RNG and data position) is
returned for Lightning to restore as usual. Any other path goes to Lightning's method unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["install", "needs_install"]

log = logging.getLogger(__name__)


def needs_install(strategy: Any) -> bool:
    """``strategy`` loads checkpoints without the CheckpointIO plugin (ModelParallelStrategy)."""
    return any(cls.__name__ == "ModelParallelStrategy" for cls in type(strategy).__mro__)


def install(strategy: Any) -> None:
    """Wrap ``strategy.load_checkpoint`` (idempotent; see the module docstring)."""
    if getattr(strategy, "_ckpt_plugins_load", None) is not None:
        return
    from ckpt_plugins.lightning.load_hook import is_ours
    from ckpt_plugins.lightning.reader import read_lightning_checkpoint

    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = strategy.broadcast(checkpoint_path)
        if not is_ours(path):
            return dict(original(path, weights_only=weights_only))
        module = strategy.lightning_module
        target = {"state_dict": module, "optimizer_states": list(strategy.optimizers)}
        log.info("restoring %s into the sharded module and %d optimizer(s)", path, len(strategy.optimizers))
        return read_lightning_checkpoint(path, target=target, strict=module.strict_loading)

    strategy._ckpt_plugins_load = original
    strategy.load_checkpoint = load_checkpoint
