"""What a ``CheckpointManager`` asks of the in-memory tier: the thin hooks of ``manager.py``.

* ``save``: every save writes a snapshot; only a step divisible by ``persist_every_n_steps`` goes
  on to the directory (:meth:`TierHooks.save` returns None then).
* ``latest_step`` / ``restore("latest")``: the newest of memory and disk. Under torch.distributed
  the ranks agree on the newest step complete in memory across them, counting a peer's copy; a rank
  that lost its own gets it back from the peer; with none complete, every rank uses the disk.
* ``close``: persist the newest snapshot if the directory has nothing as new, then free the memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ckpt_plugins.distributed import all_gather_object, is_distributed
from ckpt_plugins.errors import UnsupportedStateError
from ckpt_plugins.files.tensor_file import HashingWriter
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.memory.tier import MARK, MemoryTier
from ckpt_plugins.options.memory import MemoryTierOptions
from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.tree.codec import flatten_state

__all__ = ["TierHooks", "complete_step", "copy_to", "open_tier"]

log = logging.getLogger(__name__)


def open_tier(
    options: MemoryTierOptions | None,
    persist_every_n_steps: int,
    *,
    directory: str,
    rank: int,
    world_size: int,
    prefix: str,
    read_only: bool = False,
) -> TierHooks | None:
    """The tier of one manager (None when ``memory_tier`` is off). Under torch.distributed with
    ``peers`` every rank makes the peers' gloo group here, together."""
    if options is None:
        return None
    tier = MemoryTier(
        options, directory=directory, rank=rank, world_size=world_size, prefix=prefix, read_only=read_only
    )
    if options.peers and world_size > 1 and is_distributed() and not read_only:
        import torch.distributed as dist

        from ckpt_plugins.memory.peers import RingPeers

        tier.peers = RingPeers(tier, dist.new_group(backend="gloo"))
    return TierHooks(tier, persist_every_n_steps)


def copy_to(tier: MemoryTier, step: int, layout: Layout, chunk: int = 8 << 20) -> str:
    """Commit the (one-rank) snapshot of ``step`` into ``layout``'s directory by copying its files:
    they are the format a save writes, so no decode and encode, and no helper threads (this runs at
    interpreter exit too, when new thread pools are refused). The manifest is the snapshot's
    without the memory mark; the commit is the directory's own protocol."""
    tier.settle()
    source = tier.path_for(step)
    manifest = tier.layout.read_manifest(source)
    storage = layout.storage
    temp = layout.new_temp_dir(step)
    files = dict(manifest.files)
    try:
        storage.makedirs(temp)
        for name, record in manifest.files.items():
            with open(os.path.join(source, name), "rb") as src, storage.open_write(storage.join(temp, name)) as raw:
                # a checksum a crashed run never recorded (memory.mapped) is taken now, on the way
                out = raw if record.checksummed else HashingWriter(raw)
                while block := src.read(chunk):
                    out.write(block)
            if isinstance(out, HashingWriter):
                files[name] = out.record() or record
        user_metadata = {k: v for k, v in manifest.user_metadata.items() if k != MARK}
        manifest = dataclasses.replace(manifest, files=files, user_metadata=user_metadata)
        return layout.commit(temp, manifest, replace=storage.exists(layout.path_for(step)))
    except BaseException:
        layout.discard(temp)
        raise


def complete_step(views: list[tuple[list[int], list[int]]]) -> tuple[int | None, dict[int, int]]:
    """The newest step complete in memory across the ranks, and who sends whom a lost snapshot.

    ``views[q]`` is rank q's ``(own steps, steps of its copy of rank q-1)``. A step is complete when
    every rank q has its own snapshot of it, or rank q+1 holds q's copy; ``holders`` maps each rank
    that lacks its own to the rank that holds it. ``(None, {})`` when no step is complete.
    """
    world = len(views)
    for step in sorted({s for v in views for s in v[0]} | {s for v in views for s in v[1]}, reverse=True):
        holders: dict[int, int] = {}
        for q in range(world):
            if step in views[q][0]:
                continue
            if world > 1 and step in views[(q + 1) % world][1]:
                holders[q] = (q + 1) % world
            else:
                break
        else:
            return step, holders
    return None, {}


class TierHooks:
    """The tier as the manager sees it."""

    def __init__(self, tier: MemoryTier, persist_every_n_steps: int) -> None:
        self.tier = tier
        self.persist_every_n_steps = persist_every_n_steps

    def persists(self, step: int) -> bool:
        return step % self.persist_every_n_steps == 0

    def save(
        self,
        step: int,
        state: Any,
        *,
        flat: Any,
        rank_flat: Any,
        unstorable: str | None,
        extra_files: Mapping[str, Any] | None,
        metrics: dict[str, float],
        user_metadata: Mapping[str, Any] | None,
        retention: dict[str, Any] | None,
        submit: Callable[[SaveHandle, Callable[[SaveHandle], str]], SaveHandle] | None = None,
    ) -> SaveHandle:
        """Write the snapshot of ``step``; its handle (``stats``: stall_s, memory_s). Committed on
        return, or with ``submit`` (overlap mode) queued on the manager's writer."""
        t0 = time.perf_counter()
        if unstorable:
            raise UnsupportedStateError(unstorable)
        if flat is None or not flat.plain:  # other ranks: their snapshot holds the shared state too
            flat = flatten_state(state)
        handle = self.tier.snapshot(
            step,
            flat=flat,
            rank_flat=rank_flat,
            extra_files=extra_files,
            metrics=metrics,
            user_metadata=user_metadata,
            retention=retention,
            submit=submit,
        )
        elapsed = time.perf_counter() - t0
        handle.stats.update(step=step, stall_s=elapsed, memory_s=elapsed)
        return handle

    # --- choosing ------------------------------------------------------------------------------
    def newest(self) -> int | None:
        """This rank's newest snapshot that verifies (no collective)."""
        usable = self.tier.usable()
        return usable[0] if usable else None

    def agree(self, disk_latest: int | None) -> int | None:
        """The step every rank restores from memory, or None (use the directory): the newest step
        complete in memory across the ranks (own snapshot or the peer's copy), if it is not older
        than ``disk_latest``. A rank whose own snapshot is gone gets it back from its peer here.
        A collective under torch.distributed: every rank calls it."""
        tier = self.tier
        alone = not (tier.world_size > 1 and is_distributed())
        own = tier.usable(full=not alone)  # alone: the read checks the checksums (one pass, not two)
        peer = tier.usable(tier.peer_layout) if tier.peers is not None else []
        views = [(own, peer)] if alone else all_gather_object((own, peer))
        chosen, holders = complete_step(views)
        if chosen is None or (disk_latest is not None and chosen < disk_latest):
            if any(v[0] or v[1] for v in views):
                log.warning(
                    "memory tier: no step is complete in memory on every rank%s; using the directory",
                    "" if chosen is None else f" newer than the directory's step {disk_latest}",
                )
            return None
        for q, holder in sorted(holders.items()):  # same order on every rank: no deadlock
            if tier.rank == holder:
                tier.peers.send_back(chosen, q)
            elif tier.rank == q:
                tier.peers.receive_back(holder)
                tier.usable()  # verify what arrived
        return chosen

    def path_if_held(self, step: int) -> str | None:
        """This rank's snapshot of ``step`` if it verifies, else None."""
        return self.tier.path_for(step) if step in self.tier.usable() else None

    # --- end of the run --------------------------------------------------------------------------
    def finish(self, manager: Any) -> None:
        """``close()``: persist the newest snapshot when the directory has nothing as new, then stop
        the peers and free the memory (a ``read_only`` manager leaves both as they are). Under
        torch.distributed without a process group any more (closed at interpreter exit), nothing is
        persisted and the snapshots stay (a WARNING)."""
        tier = self.tier
        manager._persister.engine.flush()  # overlap mode: the snapshots still queued on the writer
        if manager.read_only:  # reads only: the snapshots stay for the run that writes
            tier.close()
            return
        steps = manager.steps()
        # under torch.distributed: the step every rank holds (a collective)
        step = self.agree(None) if tier.world_size > 1 and is_distributed() else self.newest()
        if step is not None and (not steps or step > steps[-1]):
            if tier.world_size > 1 and not is_distributed():
                log.warning(
                    "memory tier: the snapshot of step %d is newer than %s, but the process group is gone; "
                    "it stays in %s for the next run",
                    step,
                    manager.directory,
                    tier.folder,
                )
                tier.close()
                return
            log.info("memory tier: persisting the snapshot of step %d to %s before freeing it", step, manager.directory)
            if tier.world_size == 1 and getattr(manager, "mirror", None) is None:
                copy_to(tier, step, manager.layout)
                manager.prune()
            else:  # the ordinary save: every rank writes its part, rank 0 commits (and a mirror uploads)
                manager._persist_snapshot(step, tier.read(step))
        tier.close()
        tier.discard()
