"""Writing a ``torch.distributed.checkpoint`` (DCP) folder from full plain state, with DCP itself.

This is the one place the package writes pickles, and only because the user asked for DCP's
format: DCP's ``FileSystemWriter`` stores ``.metadata`` and every item as pickles. The folder is
written by ``torch.distributed.checkpoint.save`` (one process, ``no_dist=True``) into a hidden
temporary folder beside the destination, then renamed into place; an existing DCP folder there is
replaced (moved aside first, removed after), anything else is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.formats.dcp_metadata import METADATA_NAME
from ckpt_plugins.storage.local import LocalStorage

__all__ = ["check_destination", "write_dcp"]

log = logging.getLogger(__name__)


def check_destination(dst: str | os.PathLike) -> None:
    """Refuse ``dst`` unless it is free or a DCP folder (which a write replaces).

    Raises:
        ConfigError: something else is at ``dst``.
    """
    dst = os.fspath(dst)
    if os.path.lexists(dst) and not os.path.isfile(os.path.join(dst, METADATA_NAME)):
        raise ConfigError(f"{dst} exists and is not a DCP folder; pass a new path (nothing was written)")


def write_dcp(state: Mapping[str, Any], dst: str | os.PathLike) -> str:
    """Write ``state`` (nested dicts/lists of tensors and plain values) as a DCP folder at ``dst``.

    DCP stores dict keys as strings and non-tensor values as ``torch.save`` pickles (read back
    here with torch's ``weights_only`` loader, by DCP with it too).

    Returns:
        The folder written.

    Raises:
        ConfigError: ``state`` is not a dict with string keys at the top, or ``dst`` exists and is
            not a DCP folder.
    """
    dst = os.path.abspath(os.fspath(dst))
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ConfigError(
            f"a DCP checkpoint holds a dict with string keys at the top; {dst} would get {type(state).__name__}"
        )
    check_destination(dst)
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": expected
            dcp_save(dict(state), checkpoint_id=tmp, no_dist=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replacing = os.path.lexists(dst)
    if replacing:
        os.rename(dst, trash)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if replacing:
            os.rename(trash, dst)  # the old folder goes back: a failed convert damages nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LocalStorage().fsync_dir(parent)
    if replacing:
        shutil.rmtree(trash, ignore_errors=True)
    log.info("Wrote DCP folder %s", dst)
    return dst
