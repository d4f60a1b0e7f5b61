"""The read side of sharded tensors: ranged, verified reads of the boxes a target needs.

A restore puts a :class:`ShardedRef` in the state for each sharded tensor instead of reading it.
The target decides what is read: a DTensor target reads the boxes of its own local shard
(:meth:`ShardedRef.local`), an FSDP1 ``ShardedTensor`` target those of its local shards, a plain
tensor or module reads the whole tensor (:meth:`ShardedRef.full`),
and what no target claims is read in full at the end (:func:`resolve_all`). Each box is read from
the chunks it overlaps, one contiguous byte span per chunk (the smallest that covers the overlap),
widened to the checksum blocks it touches when verifying, so a rank reads about what it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import xxhash

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.tensor_file import tensor_bytes
from ckpt_plugins.sharded.format import Chunk, ShardedEntry, ShardedIndex
from ckpt_plugins.sharded.layout import Box, boxes_for, is_distributed, is_sharded_tensor
from ckpt_plugins.storage.base import Storage
from ckpt_plugins.tree.walk import map_leaves

__all__ = ["ChunkReader", "ShardedRef", "is_ref", "resolve_all", "resolve_like", "slice_like"]


def _strides(sizes: Sequence[int]) -> list[int]:
    out, step = [], 1
    for n in reversed(sizes):
        out.append(step)
        step *= n
    return out[::-1]


class ChunkReader:
    """Reads boxes of the sharded tensors of one checkpoint folder; counts what it read."""

    def __init__(self, storage: Storage, folder: str, index: ShardedIndex, *, verify: bool) -> None:
        self.storage, self.folder, self.index, self.verify = storage, folder, index, verify
        self.bytes_read = 0
        self.reads = 0

    def refs(self, keys: set[str] | None) -> dict[str, ShardedRef]:
        """A ref for every sharded tensor key in ``keys`` (all when None)."""
        wanted = (
            self.index.tensors if keys is None else {k: self.index.tensors[k] for k in keys if k in self.index.tensors}
        )
        return {k: ShardedRef(k, e, self) for k, e in wanted.items()}

    def read_box(self, entry: ShardedEntry, offsets: Sequence[int], sizes: Sequence[int], out: torch.Tensor) -> None:
        """Fill ``out`` (shape ``sizes``) with the box of the global tensor at ``offsets``."""
        for chunk in entry.chunks:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets, strict=True)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
            if any(low >= high for low, high in zip(lo, hi, strict=True)):
                continue
            region = self._region(
                entry,
                chunk,
                [low - c for low, c in zip(lo, chunk.offsets, strict=True)],
                [high - low for low, high in zip(lo, hi, strict=True)],
            )
            where = tuple(slice(low - o, high - o) for low, high, o in zip(lo, hi, offsets, strict=True))
            out[where].copy_(region)

    def _region(self, entry: ShardedEntry, chunk: Chunk, rel: list[int], size: list[int]) -> torch.Tensor:
        """The part ``rel``/``size`` of ``chunk`` (a strided view over the bytes read)."""
        item, block = entry.itemsize, self.index.block_bytes
        strides = _strides(chunk.sizes)
        first = sum(r * s for r, s in zip(rel, strides, strict=True))
        last = sum((r + n - 1) * s for r, n, s in zip(rel, size, strides, strict=True)) + 1
        lo, hi = first * item, last * item
        if self.verify:
            lo, hi = lo // block * block, min(-(-hi // block) * block, chunk.end - chunk.begin)
        buf = torch.empty(hi - lo, dtype=torch.uint8)
        path = self.storage.join(self.folder, chunk.file)
        with self.storage.open_read(path) as f:
            f.seek(chunk.begin + lo)
            got = cast(Any, f).readinto(tensor_bytes(buf))
        if got != hi - lo:
            raise CorruptCheckpointError(
                f"{path}: file ends inside the chunk at {list(chunk.offsets)}; it is truncated"
            )
        self.bytes_read += hi - lo
        self.reads += 1
        if self.verify:
            view = tensor_bytes(buf)
            for i, start in enumerate(range(0, hi - lo, block)):
                digest = xxhash.xxh3_64_hexdigest(view[start : start + block])
                if digest != chunk.digests[lo // block + i]:
                    raise CorruptCheckpointError(
                        f"{path}: checksum mismatch in block {lo // block + i} of the chunk at "
                        f"{list(chunk.offsets)} (xxh3 {digest}, manifest {chunk.digests[lo // block + i]}); "
                        "the file is damaged"
                    )
        elems = buf.view(entry.dtype) if hi > lo else torch.empty(0, dtype=entry.dtype)
        return torch.as_strided(elems, size, strides, (first * item - lo) // item)


class ShardedRef:
    """A sharded tensor of a checkpoint, not read yet: ``shape`` and ``dtype`` are global."""

    is_sharded_ref = True

    def __init__(self, key: str, entry: ShardedEntry, reader: ChunkReader) -> None:
        self.key, self.entry, self.reader = key, entry, reader
        self.shape = torch.Size(entry.shape)
        self.dtype = entry.dtype

    def __repr__(self) -> str:
        return (
            f"ShardedRef({self.key!r}, shape={list(self.shape)}, dtype={self.dtype}, {len(self.entry.chunks)} chunks)"
        )

    def numel(self) -> int:
        return math.prod(self.shape)

    def full(self) -> torch.Tensor:
        """The whole tensor, as a plain CPU tensor."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if out.numel():
            self.reader.read_box(self.entry, [0] * len(self.shape), list(self.shape), out)
        return out

    def local(self, template: Any) -> Any:
        """A DTensor (or ShardedTensor) laid out like ``template``, one of the same global shape,
        holding this rank's shard: only the boxes of that shard are read."""
        return _build_like(
            template, self.dtype, lambda box, out: self.reader.read_box(self.entry, box.offsets, box.sizes, out)
        )

    def like(self, template: Any) -> Any:
        """This rank's shard when ``template`` is a DTensor or ShardedTensor, else the whole tensor."""
        if is_distributed(template):
            if tuple(template.shape) != tuple(self.shape):
                raise ValueError(f"target shape {list(template.shape)} differs from {list(self.shape)}")
            return self.local(template)
        return self.full()


def _build_like(template: Any, dtype: torch.dtype, fill: Any) -> Any:
    """A DTensor with ``template``'s mesh, placements and global shape whose local shard is
    filled box by box by ``fill(box, out_view)`` (for a ShardedTensor template: a ShardedTensor
    with its metadata, each local shard filled so)."""
    if is_sharded_tensor(template):
        return _build_sharded_like(template, dtype, fill)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, mesh, placements = torch.Size(template.shape), template.device_mesh, tuple(template.placements)
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    out = torch.empty(local_shape, dtype=dtype)
    for box in boxes_for(tuple(shape), mesh, placements):
        fill(box, out[box.slices()])
    return DTensor.from_local(
        out.to(template.to_local().device),
        mesh,
        placements,
        run_check=False,
        shape=shape,
        stride=tuple(_strides(shape)),
    )


def _build_sharded_like(template: Any, dtype: torch.dtype, fill: Any) -> Any:
    """A ShardedTensor with ``template``'s global metadata and process group (no collective)."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.shard import Shard

    shards = []
    for shard in template.local_shards():
        sizes = tuple(shard.metadata.shard_sizes)
        out = torch.empty(sizes, dtype=dtype)
        if out.numel():
            fill(Box(tuple(shard.metadata.shard_offsets), sizes, (0,) * len(sizes)), out)
        shards.append(Shard(out.to(shard.tensor.device), shard.metadata))
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, template.metadata(), process_group=template._process_group
    )


def slice_like(tensor: torch.Tensor, template: Any) -> Any:
    """This rank's shard of a full plain ``tensor``, as a DTensor (or ShardedTensor) laid out like
    ``template`` (a checkpoint saved unsharded, restored into a sharded module: no communication)."""

    def fill(box: Any, out: torch.Tensor) -> None:
        out.copy_(tensor[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes, strict=True))])

    return _build_like(template, tensor.dtype, fill)


def is_ref(value: Any) -> bool:
    return isinstance(value, ShardedRef)


def resolve_like(value: Any, template: Any) -> Any:
    """``value`` in ``template``'s layout: a ref is read so, a full plain tensor is sliced so when
    the template is a DTensor or ShardedTensor of its shape; anything else as it is."""
    if isinstance(value, ShardedRef):
        return value.like(template)
    if (
        isinstance(value, torch.Tensor)
        and is_distributed(template)
        and not is_distributed(value)
        and tuple(value.shape) == tuple(template.shape)
    ):
        return slice_like(value, template)
    return value


def resolve_all(state: Any) -> Any:
    """``state`` with every ref still in it read in full (what no target claimed)."""
    return map_leaves(state, lambda v: v.full() if isinstance(v, ShardedRef) else v)
