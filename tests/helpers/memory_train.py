"""A seeded training loop with the in-memory tier, for the memory-tier tests (and its own child).

``train_to(step)`` replays a run in-process (the reference a restored state must equal bit for
bit). As a child process (``python memory_train.py DIR [--persist K] [--until N] [--keep N]``):
restore "latest" if there is one, then train and save every step, printing "saved <step>" after
each save() returned; with ``--until`` it stops there and exits normally (no close(): the exit
hooks must free the memory), else it runs until it is killed.
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


def train_step(model, opt, step: int) -> None:
    """One step; its batch depends on the step alone (the data position), dropout on the global RNG."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 16, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
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
    args = parser.parse_args()
    model, opt = make()
    mgr = CheckpointManager(
        args.directory, memory_tier=MemoryTierOptions(keep=args.keep), persist_every_n_steps=args.persist
    )
    start = 0
    if mgr.latest_step() is not None:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
        restore_rng(mgr.restore_rank_state(mgr.restored_step)["rng"])
        start = mgr.restored_step
    print(f"ready {start}", flush=True)
    step = start
    while args.until is None or step < args.until:
        step += 1
        train_step(model, opt, step)
        mgr.save(step, state_of(model, opt, step), rank_state={"rng": capture_rng()})
        print(f"saved {step}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
