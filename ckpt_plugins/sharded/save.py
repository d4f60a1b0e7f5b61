"""The save side of sharded tensors: what this rank writes, and the manifest section rank 0 builds.

:func:`shard_leaf` turns a DTensor met while flattening the state into its global shape, dtype and
the chunks this rank owns (views of its local shard). Each rank writes its owned chunks into one
safetensors file (:func:`write_shard_file`), whose chunk entries (offsets, sizes, byte ranges,
block checksums) travel to rank 0 in the rank's part file; rank 0 joins them into the manifest's
``sharded`` section (:func:`build_index`), checking that they tile every tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from ckpt_plugins.errors import SaveError, UnsupportedStateError
from ckpt_plugins.files.tensor_file import FileRecord, data_offsets, write_tensor_file
from ckpt_plugins.sharded.format import (
    BLOCK_BYTES,
    Chunk,
    ShardedEntry,
    ShardedIndex,
    block_digests,
    check_tiling,
    chunk_name,
    dtype_code,
)
from ckpt_plugins.sharded.layout import is_sharded_tensor, local_boxes, owns_local_shard, sharded_tensor_boxes
from ckpt_plugins.storage.base import Storage

__all__ = [
    "ShardLeaf",
    "build_index",
    "shard_file_name",
    "shard_leaf",
    "summary",
    "write_chunk_file",
]


@dataclass(frozen=True)
class ShardLeaf:
    """A DTensor of the state: global shape and dtype, and the chunks this rank writes
    (``chunk name -> (offsets, sizes, contiguous tensor)``; empty on ranks that do not own it)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: dict[str, tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]] = field(default_factory=dict)


def shard_file_name(rank: int) -> str:
    return f"shard_{rank}.safetensors"


def shard_leaf(dtensor: Any, key: str) -> ShardLeaf:
    """The :class:`ShardLeaf` of ``dtensor`` (a DTensor, or an FSDP1 ``ShardedTensor``, whose local
    shards are stored as the same chunks) stored under tensor key ``key``.

    Raises:
        UnsupportedStateError: a Partial placement, or a dtype safetensors cannot hold (the
            message says what the value is: "is a DTensor ...", for the caller to prefix).
    """
    try:
        dtype_code(dtensor.dtype)
    except TypeError:
        raise UnsupportedStateError(
            f"is a DTensor of dtype {dtensor.dtype}, which cannot be stored in a safetensors file"
        ) from None
    if is_sharded_tensor(dtensor):
        leaf = ShardLeaf(tuple(dtensor.shape), dtensor.dtype)
        for box, data in sharded_tensor_boxes(dtensor):
            part = data.detach()
            leaf.chunks[chunk_name(key, box.offsets)] = (box.offsets, box.sizes, part.contiguous())
        return leaf
    boxes = local_boxes(dtensor)
    leaf = ShardLeaf(tuple(dtensor.shape), dtensor.dtype)
    if not owns_local_shard(dtensor):
        return leaf
    local = dtensor.to_local().detach()
    for box in boxes:
        part = local[box.slices()] if len(boxes) > 1 or tuple(local.shape) != box.sizes else local
        if not part.is_contiguous():
            part = part.contiguous()
        leaf.chunks[chunk_name(key, box.offsets)] = (box.offsets, box.sizes, part)
    return leaf


def summary(shards: Mapping[str, ShardLeaf]) -> tuple[int, str, int]:
    """What one rank says about its sharded tensors in the save agreement (fixed size):
    how many, an xxh3 of their keys, shapes and dtypes (equal on every rank), and how many
    chunks this rank writes."""
    described = json.dumps([[k, list(v.shape), str(v.dtype)] for k, v in shards.items()], separators=(",", ":"))
    return len(shards), xxhash.xxh3_64_hexdigest(described.encode()), sum(len(v.chunks) for v in shards.values())


def shard_tensors(shards: Mapping[str, ShardLeaf]) -> dict[str, torch.Tensor]:
    """The chunks this rank writes, by their entry name in its shard file."""
    return {name: t for leaf in shards.values() for name, (_, _, t) in leaf.chunks.items()}


def chunk_records(
    shards: Mapping[str, ShardLeaf],
    written: Mapping[str, torch.Tensor],
    file: str,
    block_bytes: int = BLOCK_BYTES,
) -> dict[str, list[dict[str, Any]]]:
    """The manifest chunk entries of a written shard file: ``written`` are the tensors as written
    (the staged copies), hashed again here in blocks."""
    spans = data_offsets(written)
    out: dict[str, list[dict[str, Any]]] = {}
    for key, leaf in shards.items():
        for name, (offsets, sizes, _) in leaf.chunks.items():
            begin, end = spans[name]
            chunk = Chunk(offsets, sizes, file, begin, end, block_digests(written[name], block_bytes))
            out.setdefault(key, []).append(chunk.to_json())
    return out


def write_chunk_file(
    storage: Storage,
    path: str,
    file: str,
    chunks: Mapping[str, Iterable[tuple[tuple[int, ...], torch.Tensor]]],
    *,
    direct_io: bool = False,
) -> tuple[FileRecord, dict[str, list[dict[str, Any]]]]:
    """Write chunks of sharded tensors into one shard file (for converters: DCP -> ours).

    Args:
        storage, path: where (``path`` is ``storage.join(folder, file)``).
        file: the file's name in the checkpoint folder, as the manifest lists it.
        chunks: tensor key -> ``(global offsets, CPU tensor)`` of each chunk.

    Returns:
        The file's ``FileRecord`` (for the manifest's ``files``) and, per tensor key, the chunk
        entries (``sharded.tensors[key]["chunks"]``) to merge with those of other files.
    """
    leaves: dict[str, ShardLeaf] = {}
    written: dict[str, torch.Tensor] = {}
    for key, parts in chunks.items():
        leaf = None
        for offsets, tensor in parts:
            t = tensor.detach().contiguous()
            name = chunk_name(key, offsets)
            if leaf is None:
                leaf = leaves[key] = ShardLeaf((), t.dtype)
            leaf.chunks[name] = (tuple(offsets), tuple(t.shape), t)
            written[name] = t
    record = write_tensor_file(storage, path, written, direct_io=direct_io)
    return record, chunk_records(leaves, written, file)


def build_index(
    shards: Mapping[str, ShardLeaf], records: Iterable[Mapping[str, list[dict[str, Any]]]], world_size: int
) -> ShardedIndex:
    """Rank 0: the manifest's ``sharded`` section from its own view of the tensors (shape, dtype)
    and every rank's chunk entries.

    Raises:
        SaveError: a rank wrote chunks of a tensor rank 0 does not know, or the chunks do not
            tile a tensor (the ranks saved different states, or only one rank saved a state
            sharded over several).
    """
    chunks: dict[str, list[Chunk]] = {key: [] for key in shards}
    for part in records:
        for key, entries in part.items():
            if key not in chunks:
                raise SaveError(
                    f"a rank wrote chunks of the sharded tensor {key!r}, which rank 0's state does not hold"
                )
            for c in entries:
                chunks[key].append(
                    Chunk(
                        tuple(c["offsets"]),
                        tuple(c["sizes"]),
                        c["file"],
                        c["data_offsets"][0],
                        c["data_offsets"][1],
                        tuple(c["xxh3_64"]),
                    )
                )
    index = ShardedIndex(
        {
            key: ShardedEntry(leaf.shape, leaf.dtype, tuple(sorted(chunks[key], key=lambda c: c.offsets)))
            for key, leaf in shards.items()
        }
    )
    for key, entry in index.tensors.items():
        try:
            check_tiling(key, entry, "save")
        except Exception as exc:
            hint = (
                " (this manager saves on one process, distributed=False, but the DTensor is sharded over "
                "several: save with a manager on every rank)"
                if world_size == 1
                else ""
            )
            raise SaveError(f"{exc}{hint}") from None
    return index
