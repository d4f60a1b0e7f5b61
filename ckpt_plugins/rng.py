"""The random number generators of this process: capture their state and put it back.

An exact resume needs every generator the training step draws from: Python's ``random``, NumPy's
global generator, torch's CPU generator and, when CUDA is in use, one generator per device. The
states are plain values the core stores without pickle (a tuple of ints, a uint32 array, byte
tensors). Each rank captures its own, so under DDP they go into the checkpoint as ``rank_state``.
The Lightning callback uses these; a plain training loop stores ``capture_rng()`` in its state
and calls ``restore_rng`` after a restore. The HF adapter captures with ``capture_rng`` too and
writes the result in the Trainer's own ``rng_state.pth`` form (``"cpu"`` for ``"torch"``), which
the Trainer's resume code reads; ``restore_rng`` reads that form as well.

CUDA states are captured only once CUDA has been initialised: asking earlier would initialise it
(and pick a device) in a process that may never use the GPU.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The state of every generator of this process.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ByteTensor}`` plus ``"cuda": [ByteTensor, ...]``
        (one per visible device) when CUDA is initialised.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # torch leaves torch.cuda.is_initialized unannotated
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned (after a round trip through a checkpoint).

    Args:
        state: the captured state, or the Trainer's ``rng_state.pth`` form (``"cpu"`` instead of
            ``"torch"``; ``"cuda"`` one device's state). A missing ``"cuda"`` entry leaves the CUDA
            generators alone; a CUDA state for a different number of devices is skipped with a warning.
    """
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.asarray(numpy[1], dtype=np.uint32), *numpy[2:]))
    torch.set_rng_state(state["torch"] if "torch" in state else state["cpu"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # the Trainer's single-process form: the current device
    elif cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint holds CUDA RNG states for %d device(s) but %d are visible; "
                "the CUDA generators were not restored, so the resume is not bit-exact",
                len(cuda),
                torch.cuda.device_count(),
            )
