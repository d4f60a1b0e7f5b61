"""A plain PyTorch training loop with ckpt_plugins: exact resume after a crash.

Trains a tiny character-level GPT-style model (built from a config, nothing downloaded) on the
text shipped in ``examples/data``. Saves asynchronously every ``--save-every`` steps with
retention, and resumes from the latest checkpoint when there is one. ``--die-at-step`` makes the
process SIGKILL itself at that step (with a save possibly still in flight), the way a preempted
or crashed job dies.

    python examples/plain/train.py --dir runs/plain --steps 60 --die-at-step 37
    python examples/plain/train.py --dir runs/plain --steps 60     # resumes from the latest
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ckpt_plugins import CheckpointManager, capture_rng, restore_rng

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny_corpus.txt"


@dataclass
class TinyGPTConfig:
    vocab_size: int = 64
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.1


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, dropout=cfg.dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied weights: stored once, restored tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.size(1))))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def dataset(block_size: int) -> torch.utils.data.TensorDataset:
    text = DATA.read_text()
    chars = sorted(set(text))[:64]
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index.get(c, 0) for c in text])
    n = (len(ids) - 1) // block_size
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    return torch.utils.data.TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--die-at-step", type=int, default=None)
    parser.add_argument("--no-checkpoints", action="store_true", help="reference run")
    parser.add_argument("--final-weights", default=None, help="write the final weights here (.safetensors)")
    parser.add_argument("--stats", default=None, help="write save statistics here (JSON)")
    args = parser.parse_args()

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    cfg = TinyGPTConfig()
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    data = dataset(cfg.block_size)
    position = {"epoch": 0, "batch": 0, "step": 0}

    mgr = (
        None
        if args.no_checkpoints
        else CheckpointManager(
            args.dir, keep_last=args.keep_last, keep_best=1, monitor="loss", mode="min", async_save=True
        )
    )
    if mgr is not None and mgr.steps():
        # The newest checkpoint that verifies, loaded in place (strict: every key of the model,
        # optimizer and scheduler, in the right shape and dtype). A damaged newest one is skipped,
        # so continue from mgr.restored_step, not from latest_step().
        state = mgr.restore("latest", target={"model": model, "optimizer": opt, "scheduler": sched})
        restore_rng(state["rng"])
        position = state["position"]
        print(f"resumed from step {mgr.restored_step} ({mgr.last_restore_report.source})", flush=True)

    stalls = []
    while position["step"] < args.steps:
        loader = torch.utils.data.DataLoader(
            data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1000 + position["epoch"])
        )
        for batch_index, (x, y) in enumerate(loader):
            if batch_index < position["batch"]:
                continue  # already trained on before the interruption
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            position = {"epoch": position["epoch"], "batch": batch_index + 1, "step": position["step"] + 1}
            step = position["step"]
            if mgr is not None and step % args.save_every == 0:
                t0 = time.perf_counter()
                mgr.save(
                    step,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "rng": capture_rng(),
                        "position": position,
                    },
                    metrics={"loss": loss.item()},
                )
                stalls.append(time.perf_counter() - t0)
                print(
                    f"step {step:3d}  loss {loss.item():.3f}  saved (training blocked {stalls[-1] * 1e3:.1f} ms)",
                    flush=True,
                )
            if step == args.die_at_step:
                print(f"step {step:3d}  simulating a crash: SIGKILL now", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if step >= args.steps:
                break
        else:
            position = {"epoch": position["epoch"] + 1, "batch": 0, "step": position["step"]}
    if mgr is not None:
        mgr.close()
    if args.final_weights:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, args.final_weights)
    if args.stats:
        Path(args.stats).write_text(json.dumps({"stall_s": stalls}))


if __name__ == "__main__":
    main()
