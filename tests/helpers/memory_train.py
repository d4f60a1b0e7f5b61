"""A seeded training loop with the in-memory tier, for the memory-tier tests (and its own child).

``train_to(step)`` replays a run in-process (the reference a restored state must equal bit for
bit). As a child process (``python memory_train.py DIR [--persist K] [--until N] [--keep N]``):
restore "latest" if there is one, then train and save every step, printing "saved <step>" after
each save() returned; with ``--until`` it stops there and exits normally (no close(): the exit
hooks must free the memory), else it runs until it is killed. ``--overlap``: the snapshot is written
in the background (``async_save=True, snapshot="overlap"``) and the loop calls
``wait_for_snapshot()`` before each optimizer step, then prints "snapshot <step>" for the snapshot
known complete.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ckpt_plugins import CheckpointManager, MemoryTierOptions, capture_rng, restore_rng

WIDTH = 64


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, WIDTH), torch.nn.Dropout(0.2), torch.nn.Linear(WIDTH, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model, opt, step: int, before_optimizer_step=None) -> None:
    """One step; its batch depends on the step alone (the data position), dropout on the global RNG.
    ``before_optimizer_step()`` runs after the backward pass (overlap mode waits for the snapshot there)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 16, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    if before_optimizer_step is not None:
        before_optimizer_step()
    opt.step()


def state_of(model, opt, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


def train_to(step: int):
    """A fresh run to ``step``: the reference."""
    model, opt = make()
    for s in range(1, step + 1):
        train_step(model, opt, s)
    return model, opt, capture_rng()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--persist", type=int, default=5)
    parser.add_argument("--until", type=int, default=None)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--overlap", action="store_true")
    args = parser.parse_args()
    model, opt = make()
    overlap = {"async_save": True, "snapshot": "overlap"} if args.overlap else {}
    mgr = CheckpointManager(
        args.directory, memory_tier=MemoryTierOptions(keep=args.keep), persist_every_n_steps=args.persist, **overlap
    )
    start = 0
    if mgr.latest_step() is not None:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
        restore_rng(mgr.restore_rank_state(mgr.restored_step)["rng"])
        start = mgr.restored_step
    print(f"ready {start}", flush=True)
    step = start

    def snapshot_done() -> None:  # overlap mode: the previous save's snapshot is complete after this
        mgr.wait_for_snapshot()
        if step - 1 > start:
            print(f"snapshot {step - 1}", flush=True)

    while args.until is None or step < args.until:
        step += 1
        train_step(model, opt, step, snapshot_done if args.overlap else None)
        mgr.save(step, state_of(model, opt, step), rank_state={"rng": capture_rng()})
        print(f"saved {step}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
