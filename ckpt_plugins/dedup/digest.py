"""One tensor's identity for dedup: xxh3-64 over its dtype, shape and bytes."""

from __future__ import annotations

import torch
import xxhash

from ckpt_plugins.files.tensor_file import WRITE_CHUNK, tensor_bytes

__all__ = ["tensor_digest"]


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex xxh3-64 of ``dtype``, ``shape`` and the bytes of a contiguous CPU tensor: equal digests
    mean a reference restores the same tensor (not only the same bytes in another shape)."""
    hasher = xxhash.xxh3_64()
    hasher.update(f"{tensor.dtype}:{list(tensor.shape)}:".encode())
    data = tensor_bytes(tensor)
    for start in range(0, len(data), WRITE_CHUNK):
        hasher.update(data[start : start + WRITE_CHUNK])
    return hasher.hexdigest()
