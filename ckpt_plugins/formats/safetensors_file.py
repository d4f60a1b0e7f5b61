"""Reading ``.safetensors`` files: flat ``{name: tensor}`` dicts, no pickle involved.

With an ``include`` predicate only the selected tensors are read (``safe_open`` reads one tensor
at a time), so picking a few weights out of a large file costs only those weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError
from ckpt_plugins.tree.walk import join

__all__ = ["read_safetensors", "read_safetensors_metadata", "safetensors_device"]

log = logging.getLogger(__name__)


def safetensors_device(map_location: Any) -> str:
    """Turn ``map_location`` into the device string ``safe_open`` needs.

    Raises:
        ConfigError: ``map_location`` is a dict or callable (only ``torch.load`` takes those).
    """
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    if isinstance(map_location, int) and not isinstance(map_location, bool):
        return f"cuda:{map_location}"
    raise ConfigError(
        f"map_location={map_location!r} cannot be used for safetensors files: pass a device "
        f"such as 'cpu', 'cuda:0' or torch.device('cuda', 0)."
    )


def read_safetensors(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    include: Callable[[str], bool] | None = None,
    prefix: str = "",
    meta: bool = False,
) -> dict[str, torch.Tensor]:
    """Read a safetensors file into ``{name: tensor}``.

    Args:
        path: the ``.safetensors`` file.
        map_location: the device to load onto.
        include: read only tensors whose key path (``prefix`` + ``"."`` + name) satisfies it.
        prefix: key path of this file's dict inside the caller's result.
        meta: return tensors on the ``meta`` device, with the shapes and dtypes of the header and
            no data read (for listings such as ``ckpt-plugins inspect``).

    Raises:
        CorruptCheckpointError: the file is truncated or not a safetensors file.
    """
    path = os.fspath(path)
    device = safetensors_device(map_location)
    try:
        with safe_open(path, framework="pt", device=device) as f:
            names = [n for n in f.keys() if include is None or include(join(prefix, n))]  # noqa: SIM118 - safe_open has no __iter__
            log.debug("Reading %d tensors from %s", len(names), path)
            if meta:
                return {name: _meta_tensor(f.get_slice(name)) for name in names}
            return {name: f.get_tensor(name) for name in names}
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"Cannot read {path}: it is truncated or not a safetensors file ({exc}).") from exc


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
    "U16": getattr(torch, "uint16", torch.int16),
    "U32": getattr(torch, "uint32", torch.int32),
    "U64": getattr(torch, "uint64", torch.int64),
}


def _meta_tensor(view: Any) -> torch.Tensor:
    """A meta tensor with the shape and dtype of a ``safe_open`` slice (no data read)."""
    dtype = _DTYPES.get(view.get_dtype())
    if dtype is None:
        raise CorruptCheckpointError(f"safetensors dtype {view.get_dtype()!r} is not one torch knows")
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the string metadata in a safetensors header (``{}`` when there is none).

    Only the header is read.

    Raises:
        CorruptCheckpointError: the file is truncated or not a safetensors file.

    Example:
        >>> from safetensors.torch import save_file
        >>> save_file({"w": torch.zeros(1)}, "/tmp/w.safetensors", metadata={"step": "3"})
        >>> read_safetensors_metadata("/tmp/w.safetensors")
        {'step': '3'}
    """
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"Cannot read {path}: it is truncated or not a safetensors file ({exc}).") from exc
