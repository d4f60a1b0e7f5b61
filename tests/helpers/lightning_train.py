"""A small, real Lightning training run for the integration tests (in-process, or as a script).

A model with dropout, AdamW and a step-wise LR schedule, trained on a shuffled synthetic dataset
of 12 batches per epoch, with ``CheckpointCallback``. Options choose the data loader (plain
``DataLoader`` or torchdata's ``StatefulDataLoader``), DDP over 2 CPU processes, validation with
a monitored metric, a SIGKILL at a step, and a failure injected into one rank's writes.

    python tests/helpers/lightning_train.py --dir D --steps 30 --every 4 --die-at 13
    python tests/helpers/lightning_train.py --dir D --steps 30 --every 4 --resume --out final.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ckpt_plugins.lightning import CheckpointCallback


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def configure_model(self):
        """Under ModelParallelStrategy (``--strategy model_parallel``): FSDP2 over the data-parallel mesh."""
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.body[0], self.body[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.body, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.body(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.body(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


class Die(L.Callback):
    """SIGKILL the whole run (every rank) when ``global_step`` reaches ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.killpg(os.getpgrp(), signal.SIGKILL) if trainer.world_size > 1 else os.kill(os.getpid(), signal.SIGKILL)


class FailRankWrites(L.Callback):
    """On ``rank``, make its rank-file writes fail (ENOSPC) from the ``after``-th save on; every
    rank writes the exception it ends with to ``<dirpath>/error_rank<r>.txt``."""

    def __init__(self, rank: int, after: int) -> None:
        self.rank, self.after, self.saves = rank, after, 0

    def on_train_start(self, trainer, pl_module):
        mgr = trainer.checkpoint_callback.manager
        if trainer.global_rank != self.rank:
            return
        original = mgr.storage.open_write

        def open_write(path):
            if path.endswith(".safetensors") and "rank_" in os.path.basename(path):
                self.saves += 1
                if self.saves >= self.after:
                    raise OSError(28, "No space left on device (injected)", path)
            return original(path)

        mgr.storage.open_write = open_write

    def on_exception(self, trainer, pl_module, exception):
        """Every rank records what it raised, so a test can check that all of them did."""
        path = os.path.join(trainer.checkpoint_callback.dirpath, f"error_rank{trainer.global_rank}.txt")
        with open(path, "w") as f:
            f.write(f"{type(exception).__name__}: {exception}")


class AwaitSignal(L.Callback):
    """At the start of step ``at``: print ``READY <at>`` and wait (up to 120 s) until this process
    has received a preemption signal, so the signal lands inside that step on every rank."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.at:
            return
        import time

        from ckpt_plugins.persist.preemption import pending_signal

        print(f"READY {self.at}", flush=True)
        deadline = time.monotonic() + 120
        while not pending_signal() and time.monotonic() < deadline:
            time.sleep(0.01)


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--die-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", help="write the final parameters here (.safetensors)")
    p.add_argument(
        "--loader",
        choices=("plain", "seeded", "stateful"),
        default="plain",
        help="DataLoader(shuffle=True), the same with its own generator, or a StatefulDataLoader",
    )
    p.add_argument("--ddp", action="store_true")
    p.add_argument(
        "--strategy",
        default="ddp",
        help="with --ddp: ddp (subprocesses), ddp_fork, or model_parallel (ModelParallelStrategy, FSDP2)",
    )
    p.add_argument("--val", action="store_true", help="validate every 6 batches, keep the best by val_loss")
    p.add_argument("--sync", action="store_true", help="async_save=False")
    p.add_argument("--fail-rank", type=int, help="inject write failures on this rank (second save on)")
    p.add_argument("--await-signal-at", type=int, help="wait at this step until a preemption signal came")
    p.add_argument("--sync-every", type=int, default=10, help="preemption_sync_every")
    p.add_argument("--memory", type=int, help="memory_every_n_steps (the in-memory tier), instead of --every")
    p.add_argument("--persist", type=int, help="persist_every_n_steps, with --memory")
    p.add_argument("--dedup", action="store_true")
    p.add_argument("--mirror", help="mirror= (the local-first tier of an s3:// --dir)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and results do not depend on it
    try:
        return _fit(args)
    finally:
        torch.set_num_threads(threads)


def _strategy(name: str):
    if name != "model_parallel":
        return name
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _fit(args: argparse.Namespace) -> dict:
    L.seed_everything(0, workers=True)
    model = Net()
    if args.loader == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader as Loader
    else:
        Loader = DataLoader
    generator = torch.Generator().manual_seed(5) if args.loader == "seeded" else None
    train = Loader(data(96), batch_size=8, shuffle=True, generator=generator)
    val = DataLoader(data(32), batch_size=16) if args.val else None
    ckpt = CheckpointCallback(
        args.dir,
        keep_last=args.keep_last,
        every_n_train_steps=None if args.memory else args.every,
        memory_every_n_steps=args.memory,
        persist_every_n_steps=args.persist,
        async_save=not args.sync,
        preemption_sync_every=args.sync_every,
        dedup=args.dedup,
        mirror=args.mirror,
        **({"monitor": "val_loss", "keep_best": 1} if args.val else {}),
    )
    callbacks = [ckpt] + ([Die(args.die_at)] if args.die_at is not None else [])
    if args.await_signal_at is not None:
        callbacks.append(AwaitSignal(args.await_signal_at))
    if args.fail_rank is not None:
        callbacks.append(FailRankWrites(args.fail_rank, after=2))
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=2 if args.ddp else 1,
        strategy=_strategy(args.strategy) if args.ddp else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        val_check_interval=6 if args.val else None,
        limit_val_batches=None if args.val else 0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val, ckpt_path="last" if args.resume else None)
    weights = model.state_dict()
    if args.strategy == "model_parallel" and args.ddp:  # gathered by torch, on every rank
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if trainer.is_global_zero and args.out:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in weights.items()}, args.out)
    return {
        "best": ckpt.best_model_path,
        "last": ckpt.last_model_path,
        "stats": ckpt.stats.records,
        "saved": [int(r["step"]) for r in ckpt.stats.records],
        "preempted_at": ckpt.preempted_at,
    }


if __name__ == "__main__":
    summary = run(sys.argv[1:])
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print("SUMMARY " + json.dumps(summary))
