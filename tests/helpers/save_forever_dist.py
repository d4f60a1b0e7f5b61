"""Child for two-process crash tests: one rank of a 2-rank gloo group saving in a loop.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Rank 0 prints "committed <step>" once
wait() returned (every rank's part is in and the commit happened). Mode ``sync``, ``async``, or
``sharded`` (sync, the model a DTensor sharded over the ranks: each rank writes its own rows).
"""

import sys

import torch
import torch.distributed as dist

from ckpt_plugins import CheckpointManager

directory, mode = sys.argv[1], sys.argv[2]
async_save = mode == "async"
dist.init_process_group("gloo")
rank = dist.get_rank()


if mode == "sharded":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))


def model(step: int):
    if mode != "sharded":
        return {"w": torch.full((256, 1024), float(step))}
    return {"w": DTensor.from_local(torch.full((256, 1024), float(step)), mesh, [Shard(0)], run_check=False)}


with CheckpointManager(directory, keep_last=2, async_save=async_save, rank_timeout=60) as mgr:
    step = (mgr.latest_step() or 0) + 1
    model(0)  # the first DTensor sets up torch's dispatch machinery (seconds): before "ready"
    print("ready", flush=True)
    while True:
        state = {"model": model(step), "step": step}
        mgr.save(step, state, rank_state={"rank": rank, "marker": torch.full((1024,), float(rank))})
        mgr.wait()
        if rank == 0:
            print(f"committed {step}", flush=True)
        step += 1
