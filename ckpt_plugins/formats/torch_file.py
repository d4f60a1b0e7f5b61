"""Reading plain ``torch.save`` files (``.pt``, ``.pth``, ``.bin``): whatever object they hold."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ckpt_plugins.formats._pickle import MapLocation, load_pickle

__all__ = ["read_torch_file"]


def read_torch_file(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Any:
    """Return the object stored in a ``torch.save`` file, loaded with torch's safe unpickler.

    Raises:
        UnsafeCheckpointError: the file needs full pickle and ``allow_unsafe_pickle`` is False.
        CorruptCheckpointError: the file is truncated or not a torch file.
    """
    return load_pickle(path, map_location=map_location, allow_unsafe_pickle=allow_unsafe_pickle, include=include)
