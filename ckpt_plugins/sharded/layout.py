"""Where a DTensor's local shard lies in the global tensor, computed on this rank alone.

For each tensor dimension, the global indices this rank holds are the composition of its mesh
placements (``Shard``, uneven shards, the strided shards of FSDP2 + TP on one dimension), as
``torch.distributed.tensor`` computes them; consecutive indices form runs, and the product of the
runs over the dimensions is a list of boxes (one box for ordinary shardings). A box is *owned*
(written) by this rank when it sits at coordinate 0 on every ``Replicate`` mesh dimension: the
lowest rank holding it. No communication: every rank knows its own boxes.

The same geometry, applied to a target DTensor, says which boxes a restore must read.

FSDP1's sharded state dicts hold ``ShardedTensor``s (``torch.distributed._shard``) instead: each
local shard carries its own global offsets and sizes in its metadata, so its boxes are read off
it (:func:`sharded_tensor_boxes`) and stored as the same chunks, in the same manifest entries.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_plugins.errors import UnsupportedStateError

__all__ = [
    "Box",
    "is_distributed",
    "is_dtensor",
    "is_sharded_tensor",
    "local_boxes",
    "owns_local_shard",
    "sharded_tensor_boxes",
]


@dataclass(frozen=True)
class Box:
    """A box of the global tensor (``offsets``, ``sizes``) and where it sits in the local tensor
    (``local``: one start per dimension)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    local: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + s) for a, s in zip(self.local, self.sizes, strict=True))


def is_dtensor(obj: Any) -> bool:
    """``obj`` is a DTensor (without importing torch.distributed.tensor: if it was never imported,
    no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(obj, module.DTensor)


def is_sharded_tensor(obj: Any) -> bool:
    """``obj`` is a ``ShardedTensor`` (FSDP1's ``SHARDED_STATE_DICT``), checked without importing it."""
    module = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    return module is not None and isinstance(obj, module.ShardedTensor)


def is_distributed(obj: Any) -> bool:
    """``obj`` is a DTensor or a ShardedTensor: a tensor of which this rank holds only a part."""
    return is_dtensor(obj) or is_sharded_tensor(obj)


def sharded_tensor_boxes(tensor: Any) -> list[tuple[Box, torch.Tensor]]:
    """Each non-empty local shard of a ShardedTensor: its box of the global tensor, and its data.

    A ShardedTensor's shards never overlap (torch checks it when one is built), so every rank owns
    (writes) all of its own."""
    out = []
    for shard in tensor.local_shards():
        offsets, sizes = tuple(shard.metadata.shard_offsets), tuple(shard.metadata.shard_sizes)
        if all(sizes):
            out.append((Box(offsets, sizes, (0,) * len(sizes)), shard.tensor))
    return out


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """(global start, length, local start) of each run of consecutive global indices."""
    values = index.tolist()
    runs: list[tuple[int, int, int]] = []
    for pos, v in enumerate(values):
        if runs and runs[-1][0] + runs[-1][1] == v:
            start, length, local = runs[-1]
            runs[-1] = (start, length + 1, local)
        else:
            runs.append((v, 1, pos))
    return runs


def global_indices(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: list[int], placements: tuple[Any, ...]
) -> dict[int, torch.Tensor]:
    """Per sharded tensor dimension, the global indices of the local shard, in local order.

    Mirrors ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``, which
    keeps only the first index of each dimension (not enough for strided shards)."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard, _StridedShardOffsetMode

    local = list(shape)
    index: dict[int, torch.Tensor] = {}
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, _StridedShard):
            size, offs = placement._local_shard_size_and_offset(
                local[placement.dim], mesh_shape[mesh_dim], coordinate[mesh_dim], _StridedShardOffsetMode.ALL
            )
            here = torch.tensor(offs if size else [], dtype=torch.long)
        elif isinstance(placement, Shard):
            size, off = placement._local_shard_size_and_offset(
                local[placement.dim], mesh_shape[mesh_dim], coordinate[mesh_dim]
            )
            here = torch.arange(int(off), int(off) + size) if size else torch.empty(0, dtype=torch.long)
        else:
            continue
        dim = placement.dim
        previous = index.get(dim)
        index[dim] = here if previous is None else previous[here]
        local[dim] = size
    return index


def _boxes(shape: tuple[int, ...], index: dict[int, torch.Tensor]) -> list[Box]:
    per_dim = [_runs(index[d]) if d in index else [(0, n, 0)] for d, n in enumerate(shape)]
    if any(not runs for runs in per_dim):
        return []
    boxes = [Box((), (), ())]
    for runs in per_dim:
        boxes = [Box((*b.offsets, g), (*b.sizes, n), (*b.local, loc)) for b in boxes for g, n, loc in runs]
    return [b for b in boxes if all(b.sizes)]


def _spec(dtensor: Any) -> tuple[tuple[int, ...], tuple[int, ...], list[int] | None, tuple[Any, ...]]:
    mesh = dtensor.device_mesh
    placements = tuple(dtensor.placements)
    if any(p.is_partial() for p in placements):
        raise UnsupportedStateError(
            f"is a DTensor with a Partial placement {placements}; reduce it first "
            "(dtensor.redistribute(placements=[Replicate()]) or a Shard placement) before saving it"
        )
    coordinate = mesh.get_coordinate()
    return tuple(dtensor.shape), tuple(mesh.shape), coordinate, placements


def local_boxes(dtensor: Any) -> list[Box]:
    """The boxes of the global tensor this rank's local shard of ``dtensor`` holds (empty off its mesh)."""
    shape, mesh_shape, coordinate, placements = _spec(dtensor)
    if coordinate is None:
        return []
    return _boxes(shape, global_indices(shape, mesh_shape, coordinate, placements))


def owns_local_shard(dtensor: Any) -> bool:
    """This rank writes its shard: it is at coordinate 0 on every ``Replicate`` mesh dimension."""
    coordinate = dtensor.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(c == 0 for c, p in zip(coordinate, dtensor.placements, strict=True) if p.is_replicate())


def boxes_for(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> list[Box]:
    """The boxes a DTensor of ``shape`` with this mesh and placements holds on this rank (for a target)."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return []
    return _boxes(shape, global_indices(shape, tuple(mesh.shape), coordinate, tuple(placements)))
