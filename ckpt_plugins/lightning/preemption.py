"""Save on preemption inside ``Trainer.fit``: the signals, Lightning's launcher and SLURM requeue.

While training runs, the preemption signals get the core's handler
(:mod:`ckpt_plugins.persist.preemption`) instead of Lightning's SIGTERM handler, whose
``SIGTERMException`` would end training at the end of the very step the signal arrived in,
before the ranks could agree on a step to save. Two things of Lightning's are kept:

* its subprocess launcher (``strategy="ddp"`` started from a script): the signal is forwarded to
  the other ranks, as Lightning's own handler does, so every rank has the flag;
* SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``): its handler on the requeue signal
  still runs after ours (it writes Lightning's ``hpc_ckpt`` and calls ``scontrol requeue``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ckpt_plugins.persist.preemption import add_forwarder

__all__ = ["start_watch"]

log = logging.getLogger(__name__)


def start_watch(trainer: Any, manager: Any) -> Callable[[], None]:
    """Install the handlers for this fit; returns what undoes the forwarding (the manager's
    close() gives the signals back)."""
    chain: list[int] = []
    try:
        from lightning.fabric.plugins.environments.slurm import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            chain.append(int(env.requeue_signal))
            log.info("save_on_preemption: Lightning's SLURM requeue handler keeps running on %s", env.requeue_signal)
    except (ImportError, AttributeError):
        pass
    manager.watch_preemption(chain)
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and getattr(launcher, "procs", None):
        return add_forwarder(launcher.kill)
    return lambda: None
