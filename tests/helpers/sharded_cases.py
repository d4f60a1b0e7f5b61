"""What each rank does in the sharded-state tests (tests/sharded): spawned as a gloo group of CPU
processes by :func:`launch`; every case compares, bit for bit, against full state dicts gathered
by torch (``get_model_state_dict(..., full_state_dict=True)``) that the saving run wrote.

The framework-level cases (FSDP1 as Lightning's FSDPStrategy saves it, FSDP2 through the HF
adapter's functions, accelerate on CPU) run in the same launches (tests/helpers/fsdp_cases.py).

Folders under the test's ``root``: ``plain`` (a one-process checkpoint the test writes), ``fsdp``
(2-rank FSDP2), ``tp`` (2-rank tensor parallel, optimizer saved with parameter names), ``twod``
(4-rank FSDP2 x TP), and ``expected_*.safetensors`` (full states, written by rank 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ckpt_plugins import CheckpointManager
from ports import free_port

IN, HID, OUT = 5, 8, 3  # over 3 ranks 8 rows are uneven (3, 3, 2), and 3 rows over 2 (2, 1)


def build(kind: str, mesh=None) -> nn.Module:
    """The same seeded model, plain or laid out as ``kind`` on ``mesh``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    if kind in ("tp", "twod"):
        tp_mesh = mesh["tp"] if kind == "twod" else mesh
        parallelize_module(model, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    if kind in ("fsdp", "twod"):
        dp_mesh = mesh["dp"] if kind == "twod" else mesh
        fully_shard(model[0], mesh=dp_mesh)
        fully_shard(model[2], mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer gathered in full by torch (a collective), flat: ``model/<fqn>``,
    ``optim/<fqn>/<name>``; and the param groups' scalars as ``group/<i>/<name>``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    out = {f"model/{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    osd = get_optimizer_state_dict(model, opt, options=options)
    for fqn, entry in osd["state"].items():
        out.update({f"optim/{fqn}/{name}": v for name, v in entry.items()})
    for i, group in enumerate(opt.param_groups):
        out[f"group/{i}/lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def plain_full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """:func:`full_state` of a plain model in one process (no process group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for param, entry in opt.state.items():
        out.update({f"optim/{names[id(param)]}/{k}": v for k, v in entry.items()})
    for i, group in enumerate(opt.param_groups):
        out[f"group/{i}/lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), (what, sorted(got.keys() ^ expected.keys()))
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), (what, key, got[key], value)


def local_bytes(state) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += local_bytes(value)
        elif isinstance(value, DTensor):
            total += value.to_local().numel() * value.element_size()
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


# --- the cases (each runs on every rank) ---------------------------------------------------------


def two_ranks(rank: int, world: int, root: Path) -> None:
    """1 -> 2, save FSDP2 at 2, restore at 2 and take the next step, TP save (async) and TP -> FSDP2."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    # 1 -> 2: the one-process checkpoint into FSDP2 with a fresh optimizer (no step taken yet)
    model = build("fsdp", mesh)
    opt = optimizer(model)
    with CheckpointManager(root / "plain") as mgr:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
    assert_same(full_state(model, opt), load_file(root / "expected_plain.safetensors"), "1 -> 2")

    train_step(model, opt, seed=1)
    with CheckpointManager(root / "fsdp") as mgr:
        mgr.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1})
    expected = full_state(model, opt)
    if rank == 0:
        save_file(expected, root / "expected_fsdp.safetensors")
    train_step(model, opt, seed=2)
    uninterrupted = full_state(model, opt)

    # 2 -> 2, fresh model and optimizer; then the next step is the uninterrupted run's
    model = build("fsdp", mesh)
    opt = optimizer(model)
    with CheckpointManager(root / "fsdp") as mgr:
        state = mgr.restore("latest", target={"model": model, "optimizer": opt})
        assert state["step"] == 1 and mgr.last_restore_report.ok
    assert_same(full_state(model, opt), expected, "2 -> 2")
    train_step(model, opt, seed=2)
    assert_same(full_state(model, opt), uninterrupted, "the step after a 2 -> 2 restore")

    # tensor parallel, the optimizer saved with parameter names (as Lightning does), async
    tp = build("tp", mesh)
    tp_opt = optimizer(tp)
    train_step(tp, tp_opt, seed=3)
    with CheckpointManager(root / "tp", async_save=True) as mgr:
        handle = mgr.save(3, {"model": tp.state_dict(), "optimizer": get_optimizer_state_dict(tp, tp_opt)})
        handle.wait()
    tp_expected = full_state(tp, tp_opt)
    if rank == 0:
        save_file(tp_expected, root / "expected_tp.safetensors")
    # TP -> FSDP2 at the same world size
    model = build("fsdp", mesh)
    opt = optimizer(model)
    with CheckpointManager(root / "tp") as mgr:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
    assert_same(full_state(model, opt), tp_expected, "TP -> FSDP2")
    import fsdp_cases

    fsdp_cases.two_ranks(rank, world, root)  # FSDP1 (Lightning FSDPStrategy) and HF FSDP2
    fsdp_cases.accelerate_on_cpu(rank, world, root)  # last: it sets RANK/WORLD_SIZE, builds accelerate


def three_ranks(rank: int, world: int, root: Path) -> None:
    """2 -> 3 with uneven shards, reading only this rank's byte ranges; TP (2) -> TP (3)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = build("fsdp", mesh)
    opt = optimizer(model)
    with CheckpointManager(root / "fsdp", verify=False) as mgr:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
        report = mgr.last_restore_report
    assert_same(full_state(model, opt), load_file(root / "expected_fsdp.safetensors"), "2 -> 3")
    own = local_bytes(model.state_dict()) + local_bytes(opt.state_dict()["state"])
    assert report.bytes_read == own, (rank, report.bytes_read, own)  # exactly this rank's shards

    tp = build("tp", mesh)
    tp_opt = optimizer(tp)
    with CheckpointManager(root / "tp") as mgr:
        mgr.restore("latest", target={"model": tp, "optimizer": tp_opt})
    assert_same(full_state(tp, tp_opt), load_file(root / "expected_tp.safetensors"), "TP 2 -> 3")
    import fsdp_cases

    fsdp_cases.three_ranks(rank, world, root)


def four_ranks(rank: int, world: int, root: Path) -> None:
    """1-D (FSDP2 at 2) -> 2-D (FSDP2 x TP, 2 x 2); then a 2-D save (strided shards)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = build("twod", mesh)
    opt = optimizer(model)
    with CheckpointManager(root / "fsdp") as mgr:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
    assert_same(full_state(model, opt), load_file(root / "expected_fsdp.safetensors"), "1-D -> 2-D")
    train_step(model, opt, seed=4)
    with CheckpointManager(root / "twod") as mgr:
        mgr.save(4, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    expected = full_state(model, opt)
    if rank == 0:
        save_file(expected, root / "expected_twod.safetensors")


# --- launching ------------------------------------------------------------------------------------


def _entry(rank: int, world: int, port: int, case: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[case](rank, world, Path(root))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(case: str, world: int, root: Path) -> None:
    """Run ``case`` on ``world`` CPU processes (gloo); raises if any rank fails."""
    torch.multiprocessing.spawn(_entry, args=(world, free_port(), case, str(root)), nprocs=world, join=True)
