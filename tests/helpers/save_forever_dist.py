"""Child for two-process crash tests: one rank of a 2-rank gloo group saving in a loop.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Rank 0 prints "committed <step>" once
wait() returned (every rank's part is in and the commit happened).
"""

import sys

import torch
import torch.distributed as dist

from ckpt_plugins import CheckpointManager

directory, async_save = sys.argv[1], sys.argv[2] == "async"
dist.init_process_group("gloo")
rank = dist.get_rank()
with CheckpointManager(directory, keep_last=2, async_save=async_save, rank_timeout=60) as mgr:
    step = (mgr.latest_step() or 0) + 1
    print("ready", flush=True)
    while True:
        state = {"model": {"w": torch.full((256, 1024), float(step))}, "step": step}
        mgr.save(step, state, rank_state={"rank": rank, "marker": torch.full((1024,), float(rank))})
        mgr.wait()
        if rank == 0:
            print(f"committed {step}", flush=True)
        step += 1
