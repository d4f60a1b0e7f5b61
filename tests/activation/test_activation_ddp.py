"""DDP x2 (gloo, CPU) trains with every activation-checkpointing mode.

Reentrant checkpointing under DDP fails with "Expected to mark a variable ready only once" (a
parameter's hook fires again during the recompute); the non-reentrant checkpointing used here
must not. Each rank trains 3 steps on its own data; gradients must be identical across ranks
after every backward, and equal to DDP without checkpointing.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
VOCAB, SEQ, DIM = 64, 16, 32
CASES = [  # (model, mode, find_unused_parameters)
    ("tiny", "off", False),
    ("tiny", "full", False),
    ("tiny", "every_n", False),
    ("tiny", "selective", False),
    ("tiny", "offload", False),
    ("tiny", "full", True),
    ("gpt2", "off", False),
    ("gpt2", "full", False),
    ("gpt2", "selective", False),
    ("gpt2", "full", True),
]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in self.qkv(self.ln(x)).split(c, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "tiny":
        return Tiny()
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=DIM, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    )


def train(kind: str, mode: str, find_unused: bool, rank: int) -> list[torch.Tensor]:
    """3 DDP steps; returns the flattened gradients after each backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ckpt_plugins.activation import apply_activation_checkpointing

    model = build(kind).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_activation_checkpointing(model, mode)
    ddp = DDP(model, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    grads = []
    for step in range(3):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(100 * step + rank))
        torch.manual_seed(1000 * step + rank)
        if kind == "tiny":
            logits = ddp(ids)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
        else:
            loss = ddp(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        optimizer.step()
    return grads


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind, mode, find_unused in CASES:
            grads = train(kind, mode, find_unused, rank)
            gathered = [torch.empty_like(g) for g in grads for _ in range(WORLD)]
            for i, g in enumerate(grads):
                dist.all_gather(gathered[i * WORLD : (i + 1) * WORLD], g)
            results[(kind, mode, find_unused)] = {"grads": grads, "gathered": gathered}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_two_ranks_trains_with_every_mode(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "rank0.pt")
    for case in CASES:
        gathered = results[case]["gathered"]
        for step in range(3):
            rank0, rank1 = gathered[step * WORLD : (step + 1) * WORLD]
            assert torch.equal(rank0, rank1), f"{case}: ranks disagree at step {step}"
        kind = case[0]
        reference = results[(kind, "off", False)]["grads"]
        for step, (g, ref) in enumerate(zip(results[case]["grads"], reference, strict=True)):
            torch.testing.assert_close(
                g, ref, rtol=0, atol=1e-6, msg=f"{case}: differs from no checkpointing at {step}"
            )
