"""The one place where this package unpickles: ``torch.load`` with ``weights_only=True``.

Pickle can run any code while loading, so a checkpoint from someone else is read with torch's
restricted unpickler, which rebuilds only tensors, containers, numbers and strings plus the
globals on its allow-list. On top of torch's list we allow a few data-only types that real
checkpoints hold (see :data:`DATA_ONLY_GLOBALS`); each only stores values and runs no code of
the file's choosing. Anything else is refused with :class:`UnsafeCheckpointError` naming the
global, unless the caller passes ``allow_unsafe_pickle=True`` (full pickle, trusted files only).

Files in torch's zip format are memory-mapped (``mmap=True``), so tensors that the caller does
not select are never read from disk.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch

from ckpt_plugins.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckpt_plugins.tree.walk import select

__all__ = ["DATA_ONLY_GLOBALS", "MapLocation", "load_pickle", "load_pickle_stream"]

log = logging.getLogger(__name__)

MapLocation = Any
"""What ``torch.load`` accepts as ``map_location``: a device, a string, a dict or a callable."""

_np_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core

DATA_ONLY_GLOBALS: tuple[Any, ...] = (
    # numpy uint32 arrays: the numpy RNG state in HF Trainer's rng_state*.pth (the same four
    # globals transformers allows when it resumes). An array of another dtype is still refused.
    _np_core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    # Paths and argparse namespaces: common values in Lightning ``hyper_parameters``
    # (``data_dir: Path``); rebuilding one only stores strings or attributes.
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    argparse.Namespace,
)
"""Globals allowed on top of torch's own weights_only allow-list; all of them are data-only."""

_GLOBAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+)"),  # torch >= 2.6: "Trying to load unsupported GLOBAL posix.system"
    re.compile(r"but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (\S+)"),
)


def _offending_global(message: str) -> str | None:
    """Pull the refused global (``posix.system``) out of torch's weights_only error, if it names one."""
    for pattern in _GLOBAL_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1).rstrip(".,")
    return None


def _unsafe_error(path: str, message: str) -> UnsafeCheckpointError:
    name = _offending_global(message)
    if name is None:
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        detail = reason.group(1).strip() if reason else message.strip().splitlines()[-1]
        return UnsafeCheckpointError(
            f"{path} needs full pickle to load: torch's weights_only loader refused it ({detail}); "
            f"unpickling it could run code. Pass allow_unsafe_pickle=True only for files you trust."
        )
    return UnsafeCheckpointError(
        f"{path} needs full pickle to load: it needs the global {name!r}, which torch's "
        f"weights_only loader does not allow; unpickling it could run code. Pass "
        f"allow_unsafe_pickle=True only for files you trust, or, if {name} is a data-only class, "
        f"allow it with torch.serialization.add_safe_globals([...]) and read the file again."
    )


def _data_only_globals_allowed() -> contextlib.AbstractContextManager:
    """Allow :data:`DATA_ONLY_GLOBALS` for one load (torch < 2.5 has no scoped allow-list)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    return scoped(list(DATA_ONLY_GLOBALS)) if scoped else contextlib.nullcontext()


def load_pickle(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
    prefix: str = "",
    mmap: bool = True,
) -> Any:
    """Load a ``torch.save`` file without running pickle code (unless explicitly allowed).

    Args:
        path: the file.
        map_location: passed to ``torch.load``.
        allow_unsafe_pickle: use full pickle (``weights_only=False``). Trusted files only.
        include: keep only leaves whose key path (under ``prefix``) satisfies it.
        prefix: key path of the loaded object inside the caller's result, for ``include``.
        mmap: memory-map zip-format files so unselected tensors are never read.

    Returns:
        What ``torch.load`` returned, filtered by ``include``.

    Raises:
        UnsafeCheckpointError: the file needs a global outside the allow-list (named).
        CorruptCheckpointError: the file cannot be read (truncated, not a torch file).
    """
    path = os.fspath(path)
    use_mmap = mmap and zipfile.is_zipfile(path)
    if mmap and not use_mmap:
        log.debug("%s is not in torch's zip format; loading it without mmap", path)
    obj = _torch_load(path, path, map_location=map_location, allow_unsafe_pickle=allow_unsafe_pickle, mmap=use_mmap)
    return obj if include is None else select(obj, include, prefix, empty={})


def load_pickle_stream(
    stream: IO[bytes], name: str, *, map_location: MapLocation = "cpu", allow_unsafe_pickle: bool = False
) -> Any:
    """Load one ``torch.save`` pickle from an open, seekable stream, as :func:`load_pickle` does.

    ``name`` says what the stream is in errors (``"dcp/__0_0.distcp, item 'step'"``). Used for
    the items inside DCP data files, which are ``torch.save`` pickles at an offset.

    Raises:
        UnsafeCheckpointError: the pickle needs a global outside the allow-list (named).
        CorruptCheckpointError: the bytes are not a readable ``torch.save`` pickle.
    """
    return _torch_load(stream, name, map_location=map_location, allow_unsafe_pickle=allow_unsafe_pickle, mmap=False)


def _torch_load(
    source: str | IO[bytes], name: str, *, map_location: MapLocation, allow_unsafe_pickle: bool, mmap: bool
) -> Any:
    if allow_unsafe_pickle:
        log.info("Loading %s with full pickle (allow_unsafe_pickle=True)", name)
    try:
        if allow_unsafe_pickle:
            return torch.load(source, map_location=map_location, weights_only=False, mmap=mmap)
        with _data_only_globals_allowed():
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not allow_unsafe_pickle and "weights only load failed" in str(exc).lower():
            raise _unsafe_error(name, str(exc)) from exc
        raise CorruptCheckpointError(f"Cannot read {name}: {exc}") from exc
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"Cannot read {name}: it is truncated or not a torch.save file ({exc!r}). "
            f"Check the file, or re-download / re-save it."
        ) from exc
