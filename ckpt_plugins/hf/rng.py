"""Random number generator state, per rank, in the Trainer's own ``rng_state*.pth`` form.

The Trainer restores RNG state itself on resume (``Trainer._load_rng_state``), at the right moment
(after it has skipped the batches already trained on), from ``rng_state.pth`` in a single process
and from ``rng_state_<rank>.pth`` per rank in a distributed run. So the callback only has to
capture the same dictionary the Trainer would have saved, at the same point of the step, on every
rank, and hand all of them to rank 0 (the one rank that writes the checkpoint's extra files).
Gathering happens on the training thread, where collectives belong.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch

from ckpt_plugins.distributed import all_gather_object

__all__ = ["capture_rng_state", "gather_rng_states", "rng_file_name", "serialize_rng_state"]


def capture_rng_state(distributed: bool) -> dict[str, Any]:
    """This process's RNG state, with the keys ``Trainer._load_rng_state`` reads.

    Args:
        distributed: True in a distributed run: CUDA states of every device are kept (as the
            Trainer does), else the current device's only.

    Returns:
        ``{"python", "numpy", "cpu"}`` plus ``"cuda"`` when CUDA is available.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = (torch.cuda.random.get_rng_state_all() if distributed
                         else torch.cuda.random.get_rng_state())
    return state


def gather_rng_states(distributed: bool) -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, indexed by rank (one collective; call on all ranks)."""
    return all_gather_object(capture_rng_state(distributed))


def rng_file_name(rank: int, world_size: int) -> str:
    """``rng_state.pth`` in a single process, ``rng_state_<rank>.pth`` otherwise (the Trainer's names)."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{rank}.pth"


def serialize_rng_state(state: dict[str, Any]) -> bytes:
    """The bytes of ``torch.save(state)``: what the Trainer loads with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
