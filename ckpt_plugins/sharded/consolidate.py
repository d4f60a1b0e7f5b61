"""A full model from a sharded checkpoint, streamed: one safetensors file written tensor by tensor.

The header is known before any data is read (shapes and dtypes come from the manifest and the
plain tensor file's header), so each tensor is assembled from its chunks, written and dropped
before the next: memory stays bounded by the largest tensor, whatever the model's size. Chunks
are checked block by block as they are read, and the plain tensor file against its checksum.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError
from ckpt_plugins.files.tensor_file import (
    _DTYPE_TO_CODE,
    checksum_file,
    read_header,
    read_tensor_file,
    tensor_bytes,
)
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.sharded.read import ChunkReader
from ckpt_plugins.storage import open_storage
from ckpt_plugins.tree.tags import TAG, children
from ckpt_plugins.tree.walk import iter_leaves

__all__ = ["consolidate", "is_sharded_checkpoint"]

log = logging.getLogger(__name__)


def is_sharded_checkpoint(path: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """``path`` is one of our checkpoint folders with sharded tensors (``storage_options``: for a URL)."""
    storage, root = open_storage(path, storage_options)
    if not storage.exists(storage.join(root, "manifest.json")):
        return False
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else root
    return Layout(storage, parent).read_manifest(root).sharded is not None


def _plan(
    path: str, prefix: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[list[tuple[str, torch.dtype, list[int], Callable[[], torch.Tensor]]], int]:
    """(name, dtype, shape, read) of every tensor under ``prefix``, in tree order; and the largest size."""
    storage, root = open_storage(path, storage_options)
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else root
    manifest = Layout(storage, parent).read_manifest(root)
    part = manifest.parts.get("state")
    if part is None or manifest.sharded is None:
        raise ConfigError(f"{path} is not a sharded checkpoint of ours")
    reader = ChunkReader(storage, root, manifest.sharded, verify=True)
    plain: dict[str, tuple[torch.dtype, list[int]]] = {}
    if part.tensor_file is not None:
        file_path = storage.join(root, part.tensor_file)
        expected = manifest.files[part.tensor_file]
        if checksum_file(storage, file_path, like=expected.xxh3_64) != expected:
            raise CorruptCheckpointError(
                f"{file_path}: size or checksum differs from the manifest; the file is damaged"
            )
        with storage.open_read(file_path) as f:
            entries, _ = read_header(f, file_path, expected.size)
        plain = {k: (dtype, shape) for k, (dtype, shape, _, _) in entries.items()}
    plan = []
    for key_path, leaf in iter_leaves(part.tree, children=children):
        if not key_path.startswith(prefix) or type(leaf) is not dict or leaf.get(TAG) not in ("tensor", "dtensor"):
            continue
        key = leaf["key"]
        if leaf[TAG] == "dtensor":
            entry = manifest.sharded.tensors[key]
            ref = reader.refs({key})[key]
            plan.append((key_path[len(prefix) :], entry.dtype, list(entry.shape), ref.full))
        else:
            dtype, shape = plain[key]
            file_path = storage.join(root, part.tensor_file or "")

            def read(file_path: str = file_path, key: str = key) -> torch.Tensor:
                return read_tensor_file(storage, file_path, keys=[key])[key]

            plan.append((key_path[len(prefix) :], dtype, shape, read))
    if not plan:
        raise ConfigError(f"{path} holds no tensors under {prefix!r}; there is nothing to write")
    largest = max(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, dtype, shape, _ in plan)
    return plan, largest


def consolidate(
    path: str,
    dst: str,
    *,
    prefix: str = "",
    metadata: dict[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write every tensor of the sharded checkpoint ``path`` under ``prefix`` (stripped) into the
    safetensors file ``dst`` (replaced atomically), one tensor in memory at a time. Plain values
    (numbers, strings) are left out. Returns the number of tensors written."""
    plan, largest = _plan(path, prefix, storage_options)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape, _ in plan:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_TO_CODE[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for name, dtype, shape, read in plan:
                tensor = read()
                if tensor.dtype != dtype or list(tensor.shape) != shape:
                    raise CorruptCheckpointError(f"{path}: tensor {name!r} does not match its header entry")
                out.write(tensor_bytes(tensor.contiguous()))
                del tensor
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %s: %d tensors, at most %.1f MiB in memory at once", dst, len(plan), largest / 2**20)
    return len(plan)
