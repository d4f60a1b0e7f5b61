"""Child for the DCP interop tests: one rank of a 2-rank gloo group that trains an FSDP2 model one
step and writes the sharded state with ``torch.distributed.checkpoint.save`` to ``DIR/dcp``; rank 0
also writes the full state gathered by ``get_model_state_dict(..., full_state_dict=True)`` to
``DIR/full.pt`` (the reference), and every rank saves the same sharded state with ours into
``DIR/ours``; then a fresh FSDP2 model is restored from
the DCP folder with ``CheckpointManager.restore(path, target=...)`` and rank 0 writes its full
state to ``DIR/restored_model.pt``. The layers have 5 and 3 output rows: uneven shards over 2 ranks.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Argument: DIR.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckpt_plugins import CheckpointManager

directory = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
mesh = init_device_mesh("cpu", (2,))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
torch.manual_seed(1 + rank)
model(torch.randn(4, 8)).pow(2).mean().backward()
opt.step()
sharded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": 1}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dcp.save(sharded, checkpoint_id=directory / "dcp")
full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
full = {
    "model": get_model_state_dict(model, options=full_opts),
    "optim": get_optimizer_state_dict(model, opt, options=full_opts),
    "step": 1,
}
if rank == 0:
    torch.save(full, directory / "full.pt")
# the same sharded state saved by ours too (each rank writes its own shards)
with CheckpointManager(directory / "ours") as mgr:
    mgr.save(1, sharded)
# a fresh FSDP2 model (other initial weights) restored from the DCP folder by ours, on every rank
torch.manual_seed(5)
fresh = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
for layer in (fresh[0], fresh[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(fresh, mesh=mesh)
with CheckpointManager(directory / "restore_run") as mgr:
    mgr.restore(str(directory / "dcp"), target={"model": fresh}, include="model.*")
restored = get_model_state_dict(fresh, options=full_opts)
if rank == 0:
    torch.save(restored, directory / "restored_model.pt")
dist.barrier()
dist.destroy_process_group()
