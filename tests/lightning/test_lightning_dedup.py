"""``CheckpointCallback(dedup=True)`` with a real Lightning Trainer and a frozen layer: later saves
write only what training changed, and ``fit(ckpt_path="last")`` resumes from such a checkpoint."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

import lightning as L
from ckpt_plugins.lightning import CheckpointCallback


class Frozen(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 1))
        self.body[0].requires_grad_(False)  # 85% of the parameters

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _fit(directory, steps, ckpt_path=None) -> Frozen:
    L.seed_everything(0)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=8)
    model = Frozen()
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CheckpointCallback(directory, every_n_train_steps=4, dedup=True)],
    ).fit(model, loader, ckpt_path=ckpt_path)
    return model


def test_frozen_layer_is_stored_once_and_the_run_resumes(tmp_path):
    first = _fit(tmp_path, 8)
    pool = {n.split("-")[0]: (tmp_path / ".shared" / n).stat().st_size for n in os.listdir(tmp_path / ".shared")}
    frozen_bytes = 64 * 512 * 4
    assert pool["4"] > frozen_bytes > 3 * pool["8"]  # step 8 wrote the head and optimizer state only
    manifest = json.loads((tmp_path / "epoch=0-step=8.ckpt" / "manifest.json").read_text())
    where = {k: f for f, keys in manifest["parts"]["state"]["shared"].items() for k in keys}
    assert where["state_dict.body.0.weight"].startswith("4-")
    resumed = _fit(tmp_path, 12, ckpt_path="last")
    assert torch.equal(resumed.body[0].weight, first.body[0].weight)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "epoch=0-step=4.ckpt",
        "epoch=0-step=8.ckpt",
        "epoch=1-step=12.ckpt",
    ]
