"""``torch.distributed.checkpoint`` (DCP) folders: read only with an explicit unsafe opt-in.

A DCP folder's ``.metadata`` file is a plain pickle, and DCP's reader unpickles it with full
pickle; there is no weights_only path. So reading one runs pickle code, and this package does it
only with ``allow_unsafe_pickle=True``: the folder is converted with
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` into a temporary file (in the
system temp folder, removed afterwards) and that file is loaded. Without the opt-in the reader
raises :class:`ConfigError` saying how to convert the folder yourself.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError
from ckpt_plugins.formats._pickle import MapLocation, load_pickle

__all__ = ["read_dcp"]

log = logging.getLogger(__name__)


def read_dcp(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Any:
    """Read a DCP folder into the nested state it was saved from (needs full pickle).

    Raises:
        ConfigError: ``allow_unsafe_pickle`` is False (DCP metadata is a pickle).
        CorruptCheckpointError: DCP cannot read the folder.
    """
    path = os.fspath(path)
    if not allow_unsafe_pickle:
        raise ConfigError(
            f"{path} is a torch.distributed.checkpoint folder; its .metadata file is a pickle "
            f"that can only be read with full pickle, so it is not read by default. If you "
            f"trust it, pass allow_unsafe_pickle=True, or convert it yourself with "
            f"torch.distributed.checkpoint.format_utils.dcp_to_torch_save({path!r}, 'out.pt')."
        )
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="ckpt_plugins_dcp_") as tmp:
        converted = os.path.join(tmp, "state.pt")
        log.info("Converting %s with full pickle (allow_unsafe_pickle=True)", path)
        try:
            dcp_to_torch_save(path, converted)
        except Exception as exc:  # DCP raises many kinds (CheckpointException, OSError, ...)
            raise CorruptCheckpointError(f"Cannot read DCP folder {path}: {exc!r}") from exc
        # The temporary file is deleted on exit, so it is not memory-mapped.
        return load_pickle(
            converted,
            map_location=map_location,
            allow_unsafe_pickle=True,
            include=include,
            mmap=False,
        )
