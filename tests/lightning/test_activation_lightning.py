"""Activation checkpointing through CheckpointCallback(gradient_checkpointing=...) for a Hugging
Face model inside a LightningModule (issue 12): no use_cache warning the user did not cause, and
one WARNING-level summary of what was wrapped."""

from __future__ import annotations

import logging
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
from ckpt_plugins.lightning import CheckpointCallback


class LanguageModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.gpt = GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
        )

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.gpt(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hf_model_in_a_lightning_module_no_use_cache_warning_and_one_summary(tmp_path, caplog):
    L.seed_everything(0)
    ids = torch.randint(0, 50, (32, 8))
    callback = CheckpointCallback(tmp_path, every_n_train_steps=100, gradient_checkpointing=True)
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LanguageModel(), DataLoader(TensorDataset(ids), batch_size=4))
    assert not [w for w in caught if "use_cache" in str(w.message)], [str(w.message) for w in caught]
    summaries = [
        r
        for r in caplog.records
        if r.name.startswith("ckpt_plugins")
        and r.levelno == logging.WARNING
        and "activation checkpointing" in r.getMessage()
    ]
    assert len(summaries) == 1
    assert "gpt.transformer.h.0" in summaries[0].getMessage() and "GPT2Block" in summaries[0].getMessage()
