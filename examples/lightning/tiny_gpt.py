"""A tiny GPT-2 (built from a config, nothing downloaded) and a byte-level text DataModule.

The model is ``transformers.GPT2LMHeadModel`` with a few layers of width 64; the data is the text
shipped in ``examples/data``, cut into blocks of bytes (vocabulary 256), shuffled each epoch by a
plain ``DataLoader``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning as L

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import GPT2Config, GPT2LMHeadModel

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny_corpus.txt"


class TinyGPT(L.LightningModule):
    """Fine-tunes a GPT-2-style model built from a config.

    Args:
        n_layer: transformer blocks.
        n_embd: width.
        n_head: attention heads.
        block_size: tokens per sequence.
        dropout: dropout everywhere (so the RNG matters for an exact resume).
        lr: peak learning rate of AdamW.
        warmup_steps: linear warm-up, then cosine decay to ``max_steps``.
    """

    def __init__(
        self,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 2,
        block_size: int = 32,
        dropout: float = 0.1,
        lr: float = 3e-3,
        warmup_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(
            vocab_size=256,
            n_positions=block_size,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=0,
            eos_token_id=0,
            loss_type="ForCausalLM",
        )
        self.model = GPT2LMHeadModel(config)
        self.model.loss_type = "ForCausalLM"  # the default; saying so keeps transformers quiet

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0], use_cache=False).loss)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        total = max(self.trainer.max_steps, self.hparams.warmup_steps + 1)
        warmup = torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, self.hparams.warmup_steps)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, decay], [self.hparams.warmup_steps])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TextData(L.LightningDataModule):
    """Byte-level blocks of a text file: 90% for training (shuffled), 10% for validation.

    Args:
        path: the text file (default: the corpus shipped with the examples).
        block_size: bytes per sequence (match the model's).
        batch_size: sequences per batch.
    """

    def __init__(self, path: str = str(CORPUS), block_size: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        ids = torch.tensor(list(Path(path).read_bytes()), dtype=torch.long)
        blocks = ids[: len(ids) // block_size * block_size].view(-1, block_size)
        split = max(1, len(blocks) // 10)
        self.train_set, self.val_set = TensorDataset(blocks[split:]), TensorDataset(blocks[:split])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class SimulateCrash(L.Callback):
    """For the demo: SIGKILL this process (all ranks) when ``global_step`` reaches ``at_step``,
    the way a preempted or crashed job dies (no clean-up, saves possibly in flight).

    Args:
        at_step: the step at which to die.
    """

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            print(f"step {trainer.global_step}: simulating a crash (SIGKILL)", flush=True)
            os.killpg(os.getpgrp(), signal.SIGKILL) if trainer.world_size > 1 else os.kill(os.getpid(), signal.SIGKILL)
