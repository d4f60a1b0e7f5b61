"""One rank of a 2-rank gloo job with the in-memory tier and ring peers (tests/memory/test_memory_peers.py).

``python memory_train_dist.py DIR train N``: train and save steps 1..N (memory every step, the
directory every 5th), wait until this rank holds its peer's copy of step N, print "held N" and
block until killed. ``... DIR resume M``: restore "latest", print "restored <step> <source>
<rank marker>", train on to step M, then close normally (which persists step M and frees the memory).
Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.distributed as dist

from ckpt_plugins import CheckpointManager, MemoryTierOptions, capture_rng, restore_rng
from memory_train import make, state_of, train_step


def main() -> None:
    directory, mode, until = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = make()
    mgr = CheckpointManager(directory, memory_tier=MemoryTierOptions(keep=2), persist_every_n_steps=5)
    step = 0
    if mode == "resume":
        mgr.restore("latest", target={"model": model, "optimizer": opt})
        step = mgr.restored_step
        own = mgr.restore_rank_state(step)
        restore_rng(own["rng"])
        print(f"restored {step} {mgr.last_restore_report.source} {int(own['marker'][0])}", flush=True)
    while step < until:
        step += 1
        train_step(model, opt, step)
        marker = torch.full((1024,), float(rank))
        mgr.save(step, state_of(model, opt, step), rank_state={"rng": capture_rng(), "marker": marker})
    if mode == "train":
        peers = mgr._memory.tier.peers
        while until not in peers.received:  # the copy of the peer's last snapshot has arrived
            threading.Event().wait(0.01)
        print(f"held {until}", flush=True)
        threading.Event().wait()  # until SIGKILL
    mgr.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
