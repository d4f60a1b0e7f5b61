"""The ``sharded`` section of a manifest: global shape, dtype and chunks of every sharded tensor.

A sharded tensor is stored as chunks, each a box of the global tensor (``offsets``, ``sizes``) whose
bytes (C order) lie at ``data_offsets`` in one of the checkpoint's files, with an xxh3 per
``block_bytes`` block so a ranged read verifies what it reads. docs/sharded.md is the spec; this
module builds, serialises and (for manifests read from disk, which may be hostile) validates it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.tensor_file import _CODE_TO_DTYPE, _DTYPE_TO_CODE, tensor_bytes

__all__ = [
    "BLOCK_BYTES",
    "Chunk",
    "ShardedEntry",
    "ShardedIndex",
    "block_digests",
    "chunk_name",
    "dtype_code",
    "parse_sharded",
]

BLOCK_BYTES = 1 << 20
"""Bytes per checksummed block of a chunk: a ranged read over-reads at most this much at each end."""
_DIGEST = re.compile(r"^[0-9a-f]{1,32}$")
_MAX_DIMS = 64


@dataclass(frozen=True)
class Chunk:
    """One stored box of a sharded tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    begin: int
    end: int
    digests: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "file": self.file,
            "data_offsets": [self.begin, self.end],
            "xxh3_64": list(self.digests),
        }


@dataclass(frozen=True)
class ShardedEntry:
    """A sharded tensor: its global shape and dtype, and the chunks that tile it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": dtype_code(self.dtype),
            "chunks": [c.to_json() for c in self.chunks],
        }


@dataclass(frozen=True)
class ShardedIndex:
    """Every sharded tensor of a checkpoint, by tensor key."""

    tensors: dict[str, ShardedEntry]
    block_bytes: int = BLOCK_BYTES

    def to_json(self) -> dict[str, Any]:
        return {"block_bytes": self.block_bytes, "tensors": {k: e.to_json() for k, e in self.tensors.items()}}

    def files(self) -> set[str]:
        return {c.file for e in self.tensors.values() for c in e.chunks}


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_TO_CODE[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def chunk_name(key: str, offsets: Iterable[int]) -> str:
    """The chunk's entry name in its safetensors file: ``<key>@<o0>,<o1>,...``."""
    return f"{key}@{','.join(str(o) for o in offsets)}"


def block_digests(tensor: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> tuple[str, ...]:
    """xxh3-64 of each ``block_bytes`` block of a contiguous CPU tensor's bytes."""
    view = tensor_bytes(tensor)
    return tuple(xxhash.xxh3_64_hexdigest(view[i : i + block_bytes]) for i in range(0, len(view), block_bytes))


def check_tiling(key: str, entry: ShardedEntry, where: str) -> None:
    """The chunks lie inside the tensor, have distinct offsets, and their volumes add up to it.

    Raises:
        CorruptCheckpointError: naming the tensor and what is wrong.
    """
    seen: set[tuple[int, ...]] = set()
    volume = 0
    for c in entry.chunks:
        if len(c.offsets) != len(entry.shape) or len(c.sizes) != len(entry.shape):
            raise CorruptCheckpointError(f"{where}: sharded tensor {key!r}: a chunk has the wrong number of dimensions")
        if any(o < 0 or s <= 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, entry.shape, strict=True)):
            raise CorruptCheckpointError(
                f"{where}: sharded tensor {key!r}: chunk at {list(c.offsets)} of size {list(c.sizes)} "
                f"lies outside the tensor's shape {list(entry.shape)}"
            )
        if c.offsets in seen:
            raise CorruptCheckpointError(f"{where}: sharded tensor {key!r}: two chunks at {list(c.offsets)}")
        seen.add(c.offsets)
        volume += math.prod(c.sizes)
    if volume != math.prod(entry.shape):
        raise CorruptCheckpointError(
            f"{where}: sharded tensor {key!r}: its chunks hold {volume} of its {math.prod(entry.shape)} "
            "elements; they do not tile the tensor"
        )


def _ints(where: str, value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > _MAX_DIMS
        or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62 for v in value)
    ):
        raise CorruptCheckpointError(f"{where}: {what} {value!r:.80} is not a list of non-negative ints")
    return tuple(value)


def parse_sharded(where: str, doc: Any, files: dict[str, Any]) -> ShardedIndex | None:
    """Validate the manifest's ``sharded`` section (None when absent) against its ``files``."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict):
        raise CorruptCheckpointError(f"{where}: manifest field 'sharded' is not an object with 'tensors'")
    block = doc.get("block_bytes")
    if isinstance(block, bool) or not isinstance(block, int) or not 4096 <= block <= 1 << 34:
        raise CorruptCheckpointError(f"{where}: sharded block_bytes {block!r:.40} is not a sane block size")
    tensors: dict[str, ShardedEntry] = {}
    for key, raw in doc["tensors"].items():
        if not isinstance(raw, dict) or not isinstance(raw.get("chunks"), list):
            raise CorruptCheckpointError(f"{where}: sharded tensor {key!r:.80} is not an object with 'chunks'")
        here = f"{where} [sharded {key!r:.80}]"
        shape = _ints(here, raw.get("shape"), "shape")
        dtype = _CODE_TO_DTYPE.get(raw.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise CorruptCheckpointError(f"{here}: unknown dtype {raw.get('dtype')!r:.40}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        chunks = []
        for c in raw["chunks"]:
            if not isinstance(c, dict):
                raise CorruptCheckpointError(f"{here}: a chunk is not an object")
            offsets, sizes = _ints(here, c.get("offsets"), "offsets"), _ints(here, c.get("sizes"), "sizes")
            file = c.get("file")
            if not isinstance(file, str) or file not in files:
                raise CorruptCheckpointError(f"{here}: chunk file {file!r:.80} is not listed in the manifest")
            span = _ints(here, c.get("data_offsets"), "data_offsets")
            if len(span) != 2:
                raise CorruptCheckpointError(f"{here}: chunk data_offsets {list(span)} is not [begin, end]")
            begin, end = span
            digests = c.get("xxh3_64")
            nbytes = math.prod(sizes) * itemsize
            if end - begin != nbytes or end > files[file].size:
                raise CorruptCheckpointError(
                    f"{here}: chunk at {list(offsets)} has data_offsets [{begin}, {end}), which do not hold "
                    f"{nbytes} bytes inside {file} ({files[file].size} bytes)"
                )
            if (
                not isinstance(digests, list)
                or len(digests) != -(-nbytes // block)
                or not all(isinstance(d, str) and _DIGEST.match(d) for d in digests)
            ):
                raise CorruptCheckpointError(f"{here}: chunk at {list(offsets)} has malformed xxh3_64 block digests")
            chunks.append(Chunk(offsets, sizes, file, begin, end, tuple(digests)))
        entry = ShardedEntry(shape, dtype, tuple(chunks))
        check_tiling(key, entry, where)
        tensors[key] = entry
    return ShardedIndex(tensors, block)
