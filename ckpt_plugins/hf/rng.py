"""Random number generator state, per rank, in the Trainer's own ``rng_state*.pth`` form.

The Trainer restores RNG state itself on resume (``Trainer._load_rng_state``), at the right moment
(after it has skipped the batches already trained on), from ``rng_state.pth`` in a single process
and from ``rng_state_<rank>.pth`` per rank in a distributed run. So the callback captures the state
with the core's :func:`ckpt_plugins.capture_rng` (the one capture every integration uses), on every
rank at the same point of the step, and only translates it into the file the Trainer reads: the
core's ``"torch"`` is the Trainer's ``"cpu"``, and ``"cuda"`` is one state (the current device's)
in a single process, the list of every device's under ``torch.distributed``. Gathering happens on
the training thread, where collectives belong. :func:`ckpt_plugins.restore_rng` reads either form.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ckpt_plugins.distributed import all_gather_object
from ckpt_plugins.rng import capture_rng

__all__ = ["gather_rng_states", "rng_file_name", "serialize_rng_state", "trainer_rng_state"]


def trainer_rng_state(distributed: bool) -> dict[str, Any]:
    """This process's RNG state (:func:`~ckpt_plugins.capture_rng`) with the keys
    ``Trainer._load_rng_state`` reads: ``{"python", "numpy", "cpu"}`` plus ``"cuda"`` when CUDA is
    available (as the Trainer saves it, even before CUDA has been used)."""
    core = capture_rng()
    state: dict[str, Any] = {"python": core["python"], "numpy": core["numpy"], "cpu": core["torch"]}
    if torch.cuda.is_available():
        cuda = core.get("cuda")
        if cuda is None:
            cuda = torch.cuda.random.get_rng_state_all()
        state["cuda"] = cuda if distributed else cuda[torch.cuda.current_device()]
    return state


def gather_rng_states(distributed: bool) -> list[dict[str, Any]]:
    """Every rank's :func:`trainer_rng_state`, indexed by rank (one collective; call on all ranks)."""
    return all_gather_object(trainer_rng_state(distributed))


def rng_file_name(rank: int, world_size: int) -> str:
    """``rng_state.pth`` in a single process, ``rng_state_<rank>.pth`` otherwise (the Trainer's names)."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{rank}.pth"


def serialize_rng_state(state: dict[str, Any]) -> bytes:
    """The bytes of ``torch.save(state)``: what the Trainer loads with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
