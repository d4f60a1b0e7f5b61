"""The adapters on s3:// directories: a real Lightning Trainer saving to, and resuming from, the
moto server, the endpoint from the environment (the adapters pass the URL to the core unchanged)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins import CheckpointManager
from ckpt_plugins.lightning import CheckpointCallback
from lightning_train import Net, data


def _fit(callback, steps: int, ckpt_path=None):
    L.seed_everything(0)
    model = Net()
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(model, DataLoader(data(96), batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    return trainer, model


def test_lightning_callback_saves_to_and_resumes_from_s3(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    url = f"s3://{s3_bucket}/lightning"
    _, model = _fit(CheckpointCallback(url, every_n_train_steps=4, keep_last=2), steps=12)
    with CheckpointManager(url, read_only=True) as reader:
        assert reader.steps() == [8, 12]
        saved = reader.restore("latest")
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    trainer, _ = _fit(CheckpointCallback(url, every_n_train_steps=4, keep_last=2), steps=16, ckpt_path=f"{url}/step_12")
    assert trainer.global_step == 16
    with CheckpointManager(url, read_only=True) as reader:
        assert reader.steps() == [12, 16]
