"""What each rank does in the framework-level sharded tests (tests/sharded/test_fsdp_frameworks.py):
FSDP1 (``FullyShardedDataParallel`` on CPU, gloo), as Lightning's ``FSDPStrategy`` saves it, and
FSDP2 as the HF Trainer under accelerate holds it, through the HF adapter's own save and load
functions (:mod:`ckpt_plugins.hf.fsdp`). Every restore is compared bit for bit with the full state
torch gathers (``get_model_state_dict(..., full_state_dict=True)``) in the saving run.

Folders under ``root``: ``fsdp1`` (2-rank FSDP1: model under the sharded state dict type,
optimizer from ``FSDP.optim_state_dict``), ``fsdp2_named`` (2-rank FSDP2 with the optimizer keyed
by parameter name), ``hf`` (2-rank FSDP2 through ``hf.fsdp.sharded_state``), and the
``expected_*.safetensors`` full states, written by rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ckpt_plugins import CheckpointManager
from sharded_cases import HID, IN, OUT, assert_same, build, full_state, optimizer, train_step


def build_fsdp1(use_orig_params: bool = True) -> nn.Module:
    """The seeded model of sharded_cases, wrapped in FSDP1 (each Linear its own unit) on CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    return FSDP(
        model,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        use_orig_params=use_orig_params,
    )


def lightning_context(model: nn.Module):
    """Lightning FSDPStrategy's sharded state-dict context, as
    ``lightning.fabric.strategies.fsdp._get_sharded_state_dict_context`` builds it (offload to CPU;
    restated here because importing lightning costs each spawned rank seconds)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    return FSDP.state_dict_type(
        model,
        StateDictType.SHARDED_STATE_DICT,
        ShardedStateDictConfig(offload_to_cpu=True),
        ShardedOptimStateDictConfig(offload_to_cpu=True),
    )


def fsdp1_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """What Lightning's FSDPStrategy(state_dict_type="sharded") puts in its checkpoint dict."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with lightning_context(model):
        return {"state_dict": model.state_dict(), "optimizer_states": [FSDP.optim_state_dict(model, opt)]}


def fsdp1_targets(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The targets ckpt_plugins.lightning.model_parallel.restore_target builds for FSDPStrategy."""
    from ckpt_plugins.sharded.fsdp1 import ShardedModule, ShardedOptimizer

    return {
        "state_dict": ShardedModule(model, context=lightning_context),
        "optimizer_states": [ShardedOptimizer(model, opt, context=lightning_context)],
    }


def two_ranks(rank: int, world: int, root: Path) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from ckpt_plugins.sharded import fsdp2

    mesh = init_device_mesh("cpu", (world,))
    # FSDP1, saved as Lightning's FSDPStrategy holds it: ShardedTensors
    model = build_fsdp1()
    opt = optimizer(model)
    train_step(model, opt, seed=1)
    state = fsdp1_state(model, opt)
    assert isinstance(state["state_dict"]["0.weight"], ShardedTensor)
    assert isinstance(state["optimizer_states"][0]["state"]["0.weight"]["exp_avg"], ShardedTensor)
    with CheckpointManager(root / "fsdp1") as mgr:
        mgr.save(1, {**state, "step": 1})
    expected = full_state(model, opt)
    if rank == 0:
        save_file(expected, root / "expected_fsdp1.safetensors")
    train_step(model, opt, seed=2)
    uninterrupted = full_state(model, opt)

    # FSDP1 -> FSDP1 at 2 ranks, fresh model and optimizer (no step taken); then the next step
    model = build_fsdp1()
    opt = optimizer(model)
    with CheckpointManager(root / "fsdp1") as mgr:
        mgr.restore("latest", target=fsdp1_targets(model, opt))
        assert mgr.last_restore_report.ok, mgr.last_restore_report.summary()
    assert_same(full_state(model, opt), expected, "FSDP1 2 -> 2")
    train_step(model, opt, seed=2)
    assert_same(full_state(model, opt), uninterrupted, "the step after an FSDP1 restore")

    # FSDP1 -> FSDP2 (the optimizer state keyed by names restores by position)
    model2 = build("fsdp", mesh)
    opt2 = optimizer(model2)
    with CheckpointManager(root / "fsdp1") as mgr:
        mgr.restore("latest", target={"state_dict": model2, "optimizer_states": [opt2]})
    assert_same(full_state(model2, opt2), expected, "FSDP1 -> FSDP2")

    # FSDP2 -> FSDP1
    train_step(model2, opt2, seed=3)
    with CheckpointManager(root / "fsdp2_named") as mgr:
        mgr.save(3, {"state_dict": model2.state_dict(), "optimizer_states": [get_optimizer_state_dict(model2, opt2)]})
    expected2 = full_state(model2, opt2)
    model = build_fsdp1()
    opt = optimizer(model)
    with CheckpointManager(root / "fsdp2_named") as mgr:
        mgr.restore("latest", target=fsdp1_targets(model, opt))
    assert_same(full_state(model, opt), expected2, "FSDP2 -> FSDP1")

    # HF Trainer under accelerate FSDP2: the adapter's save and load functions
    model = build("fsdp", mesh)
    opt = optimizer(model)
    assert fsdp2.is_sharded_model(model)
    train_step(model, opt, seed=4)
    with CheckpointManager(root / "hf", dir_prefix="checkpoint-") as mgr:
        mgr.save(4, fsdp2.sharded_state(model, opt))
    expected_hf = full_state(model, opt)
    if rank == 0:
        save_file(expected_hf, root / "expected_hf.safetensors")
    train_step(model, opt, seed=5)
    uninterrupted = full_state(model, opt)
    model = build("fsdp", mesh)
    opt = optimizer(model)
    folder = root / "hf" / "checkpoint-4"
    assert fsdp2.is_sharded_checkpoint_folder(folder)
    assert fsdp2.restore_model(folder, model).ok
    assert fsdp2.restore_optimizer(folder, opt).ok
    assert_same(full_state(model, opt), expected_hf, "HF FSDP2 2 -> 2")
    train_step(model, opt, seed=5)
    assert_same(full_state(model, opt), uninterrupted, "the step after an HF FSDP2 restore")


def three_ranks(rank: int, world: int, root: Path) -> None:
    """2 -> 3, uneven shards: FSDP1 into FSDP1, and the HF FSDP2 checkpoint into FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    from ckpt_plugins.sharded import fsdp2

    model = build_fsdp1()
    opt = optimizer(model)
    with CheckpointManager(root / "fsdp1") as mgr:
        mgr.restore("latest", target=fsdp1_targets(model, opt))
    assert_same(full_state(model, opt), load_file(root / "expected_fsdp1.safetensors"), "FSDP1 2 -> 3")

    model = build("fsdp", init_device_mesh("cpu", (world,)))
    opt = optimizer(model)
    folder = root / "hf" / "checkpoint-4"
    fsdp2.restore_model(folder, model)
    fsdp2.restore_optimizer(folder, opt)
    assert_same(full_state(model, opt), load_file(root / "expected_hf.safetensors"), "HF FSDP2 2 -> 3")


def accelerate_on_cpu(rank: int, world: int, root: Path) -> None:
    """What accelerate does with the Trainer's FSDP2 plugin on 2 CPU processes: writes
    ``accelerate_rank<r>.json`` (distributed type, whether the plugin was kept, the prepared model)."""
    import json
    import os

    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    args = TrainingArguments(str(root / "acc"), fsdp=True, fsdp_config={"version": 2}, use_cpu=True, report_to=[])
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(**args.fsdp_plugin_args))
    model = accelerator.prepare(nn.Linear(IN, OUT))
    doc = {
        "plugin_args_version": args.fsdp_plugin_args["fsdp_version"],
        "distributed_type": accelerator.state.distributed_type.value,
        "fsdp_plugin": getattr(accelerator.state, "fsdp_plugin", None) is not None,
        "model": type(model).__name__,
    }
    (root / f"accelerate_rank{rank}.json").write_text(json.dumps(doc))
