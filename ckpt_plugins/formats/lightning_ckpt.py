"""Reading Lightning ``.ckpt`` files: the checkpoint dict exactly as Lightning saved it.

A ``.ckpt`` is a ``torch.save`` pickle of a dict (``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``epoch``, ``global_step``, ``loops``, ``callbacks``, ``hyper_parameters``,
...). Lightning stores ``hyper_parameters`` as a plain dict, so a default checkpoint loads with
torch's safe unpickler; paths and ``argparse.Namespace`` values in hyper-parameters are allowed
too (see ``_pickle.DATA_ONLY_GLOBALS``). OmegaConf configs and custom classes are refused
unless the caller opts in to full pickle. Lightning itself is not imported.

A ``.ckpt`` written by ``ckpt_plugins.lightning.CheckpointIOPlugin`` is one safetensors file instead
(``files/single_file``): it is read without pickle and its data checksum is verified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ckpt_plugins.files.single_file import is_single_file, read_single_file
from ckpt_plugins.formats._pickle import MapLocation, load_pickle
from ckpt_plugins.storage import LocalStorage
from ckpt_plugins.tree.walk import select

__all__ = ["read_lightning_ckpt"]

log = logging.getLogger(__name__)


def read_lightning_ckpt(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Any:
    """Return a Lightning checkpoint dict (memory-mapped; filtered by ``include`` if given).

    Raises:
        UnsafeCheckpointError: the file needs full pickle and ``allow_unsafe_pickle`` is False.
        CorruptCheckpointError: the file is truncated or not a torch file.
    """
    storage = LocalStorage()
    if is_single_file(storage, os.fspath(path)):
        state, _ = read_single_file(storage, os.fspath(path), map_location=map_location)
        return state if include is None else select(state, include, empty={})
    ckpt = load_pickle(path, map_location=map_location, allow_unsafe_pickle=allow_unsafe_pickle, include=include)
    if include is None and not (isinstance(ckpt, dict) and "state_dict" in ckpt):
        log.warning("%s has no 'state_dict' key; it may not be a Lightning checkpoint", path)
    return ckpt
