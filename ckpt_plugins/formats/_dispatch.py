"""Recognising a foreign checkpoint by its shape on disk, and routing it to its reader."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ckpt_plugins.errors import CheckpointNotFoundError, ConfigError
from ckpt_plugins.formats._pickle import MapLocation
from ckpt_plugins.formats.dcp import read_dcp
from ckpt_plugins.formats.hf_folder import HF_MARKER_FILES, read_hf_folder
from ckpt_plugins.formats.lightning_ckpt import read_lightning_ckpt
from ckpt_plugins.formats.safetensors_file import read_safetensors
from ckpt_plugins.formats.torch_file import read_torch_file
from ckpt_plugins.layout.naming import natural_key

__all__ = ["SUPPORTED_FORMATS", "detect_format", "list_foreign_checkpoints", "read_foreign"]

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_LISTED_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")

SUPPORTED_FORMATS = ("lightning", "hf", "torch", "safetensors", "dcp")
"""The formats :func:`read_foreign` reads (``"dcp"``: its metadata pickle through an allow-list)."""


def detect_format(path: str | os.PathLike) -> str | None:
    """Name the checkpoint format at ``path`` from file names alone (nothing is read).

    Returns:
        ``"ckpt_plugins"`` (a folder with ``manifest.json``), ``"dcp"`` (a folder with a
        ``.metadata`` file), ``"hf"`` (a folder with ``model.safetensors``,
        ``pytorch_model.bin``, their ``.index.json``, ``adapter_model.safetensors`` or
        ``.bin``, ``trainer_state.json`` or ``optimizer.pt``), ``"lightning"`` (a ``.ckpt`` file),
        ``"torch"`` (a ``.pt``/``.pth``/``.bin`` file), ``"safetensors"`` (a ``.safetensors``
        file), or ``None`` (anything else, including a missing path).

    Example:
        >>> detect_format("lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt")
        'lightning'
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "manifest.json")):
            return "ckpt_plugins"
        if os.path.isfile(os.path.join(path, ".metadata")):
            return "dcp"
        if any(os.path.isfile(os.path.join(path, name)) for name in HF_MARKER_FILES):
            return "hf"
        return None
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".ckpt":
        return "lightning"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix == ".safetensors":
        return "safetensors"
    return None


_READERS: dict[str, Callable[..., Any]] = {
    "lightning": read_lightning_ckpt,
    "hf": read_hf_folder,
    "torch": read_torch_file,
    "dcp": read_dcp,
}


def read_foreign(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Any:
    """Read a foreign checkpoint (Lightning, HF, torch, safetensors, DCP) into plain state.

    Pickle-based files are read with torch's ``weights_only`` unpickler, memory-mapped; no
    pickle code runs unless ``allow_unsafe_pickle=True``. See the package docstring for the
    shape returned for each format.

    Args:
        path: a file or folder; :func:`detect_format` decides how to read it.
        map_location: where tensors go, as for ``torch.load`` (a device for safetensors).
        allow_unsafe_pickle: load pickles with full pickle. Can run arbitrary code: only for
            files you trust.
        include: keep only the leaves whose key path (keys joined with ``"."``, such as
            ``"state_dict.layer.weight"``) satisfies it; other tensors are never read.

    Returns:
        The checkpoint's state: a dict for every format except a torch file, which gives back
        whatever object was saved.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        ConfigError: the format is unknown, or is a ckpt_plugins checkpoint.
        UnsafeCheckpointError: a pickle (a DCP folder's ``.metadata`` included) needs a global
            outside the allow-list (named).
        CorruptCheckpointError: a file is truncated or unreadable (named).

    Example:
        >>> state = read_foreign("checkpoint-500", include=lambda k: k.startswith("model."))
        >>> sorted(state)
        ['model']
    """
    path = os.fspath(path)
    if include is not None and not callable(include):
        raise ConfigError(f"include must be a callable taking a key path, got {include!r}")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"No checkpoint at {path!r}: the path does not exist.")
    fmt = detect_format(path)
    log.debug("Reading %s as %s", path, fmt)
    if fmt == "safetensors":
        return read_safetensors(path, map_location=map_location, include=include)
    if fmt in _READERS:
        return _READERS[fmt](
            path,
            map_location=map_location,
            allow_unsafe_pickle=allow_unsafe_pickle,
            include=include,
        )
    if fmt == "ckpt_plugins":
        raise ConfigError(
            f"{path} is a ckpt_plugins checkpoint, not a foreign one: restore it with "
            f"ckpt_plugins' own restore functions instead of read_foreign."
        )
    raise ConfigError(
        f"Cannot tell the checkpoint format of {path!r}. Supported: Lightning .ckpt files, HF "
        f"checkpoint folders (checkpoint-N, save_pretrained), torch .pt/.pth/.bin files, "
        f".safetensors files and torch.distributed.checkpoint folders "
        f"({', '.join(SUPPORTED_FORMATS)})."
    )


def list_foreign_checkpoints(directory: str | os.PathLike) -> list[str]:
    """List the foreign checkpoints directly inside ``directory``, in natural order.

    Listed: HF and DCP folders (``checkpoint-N`` and the like) and ``.ckpt``, ``.pt``, ``.pth``
    and ``.safetensors`` files. Names sort with numbers compared as numbers, so
    ``checkpoint-9`` comes before ``checkpoint-10`` and ``epoch=2-step=100.ckpt`` before
    ``epoch=10-step=5.ckpt``. Hidden names (starting with ``.``) are skipped.

    Returns:
        Paths (``directory`` joined with each name).

    Raises:
        CheckpointNotFoundError: ``directory`` is not a folder.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"Cannot list {directory!r}: it is not a folder.")
    found = []
    for name in os.listdir(directory):
        if name.startswith("."):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            if detect_format(path) in ("hf", "dcp"):
                found.append(name)
        elif name.lower().endswith(_LISTED_SUFFIXES):
            found.append(name)
    return [os.path.join(directory, name) for name in sorted(found, key=natural_key)]
