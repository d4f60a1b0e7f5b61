"""torch.distributed helpers: who am I, and agreeing on things without hanging.

Collectives run only on the caller's (training) thread, never on the background writer, because
two threads issuing collectives on one process group can interleave differently on each rank and
deadlock. The writer coordinates through the checkpoint folder instead (see ``manager``).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ckpt_plugins.errors import DistributedError, SaveError, StepExistsError, UnsupportedStateError

__all__ = ["agree_on_save", "all_gather_object", "barrier", "broadcast_object", "is_distributed", "rank_and_world"]


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


def agree_on_save(views: list[tuple[Any, ...]]) -> tuple[str, list[int], list[int]]:
    """Check what every rank said before a save; return rank 0's token, the ranks with
    ``rank_state`` and the ranks that write chunks of sharded tensors.

    Each view is ``(step, earlier_error, conflict, token, has_rank_state, unstorable, shards)`` as
    one rank sent it (one all_gather on the training thread, so every rank reaches the same verdict
    and raises the same error instead of leaving the others waiting); ``shards`` is the fixed-size
    summary of the rank's DTensors (``sharded.save.summary``: count, digest of keys/shapes/dtypes,
    chunks it writes), which must agree on every rank.

    Raises:
        SaveError: an earlier save failed on some rank.
        UnsupportedStateError: some rank's state cannot be stored.
        DistributedError: the ranks called ``save`` with different steps.
        StepExistsError: rank 0 found checkpoints at or after the step.
    """
    errors = [f"rank {r}: {v[1]}" for r, v in enumerate(views) if v[1]]
    if errors:
        raise SaveError("an earlier save failed; " + "; ".join(errors))
    unstorable = [f"rank {r}: {v[5]}" for r, v in enumerate(views) if v[5]]
    if unstorable:
        raise UnsupportedStateError("; ".join(unstorable))
    if len({v[0] for v in views}) > 1:
        raise DistributedError(
            "ranks called save() with different steps: "
            + ", ".join(f"rank {r}: {v[0]}" for r, v in enumerate(views))
            + "; every rank must save the same step"
        )
    shards = [v[6] if len(v) > 6 else (0, "", 0) for v in views]
    if len({s[:2] for s in shards}) > 1:
        raise DistributedError(
            "ranks hold different sharded tensors (DTensors: keys, global shapes or dtypes) at this save: "
            + ", ".join(f"rank {r}: {s[0]} tensors" for r, s in enumerate(shards))
            + "; every rank must save the same state"
        )
    if views[0][2]:
        raise StepExistsError(views[0][2])
    return views[0][3], [r for r, v in enumerate(views) if v[4]], [r for r, s in enumerate(shards) if s[2]]
