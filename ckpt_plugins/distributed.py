"""torch.distributed helpers: who am I, and agreeing on things without hanging.

Collectives run only on the caller's (training) thread, never on the background writer, because
two threads issuing collectives on one process group can interleave differently on each rank and
deadlock. The writer coordinates through the checkpoint folder instead (see ``manager``).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["rank_and_world", "is_distributed", "all_gather_object", "broadcast_object", "barrier"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one without torch.distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
