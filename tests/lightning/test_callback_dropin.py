"""CheckpointCallback as a drop-in for ModelCheckpoint (issue 12): Lightning's semantics, resume and
deferral, fallback past a damaged checkpoint, clear messages, data order, logger metrics."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins.lightning import CheckpointCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from lightning_names import path_of, steps_in
from lightning_train import Net, data


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (the shared fixture in tests/conftest.py), for every test here."""


def fit(callbacks, steps=12, val=True, ckpt_path=None, model=None, **kwargs):
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        val_check_interval=6 if val else None,
        limit_val_batches=None if val else 0,
        **kwargs,
    )
    trainer.fit(
        model or Net(),
        DataLoader(data(96), batch_size=8, shuffle=True),
        DataLoader(data(32), batch_size=16) if val else None,
        ckpt_path=ckpt_path,
    )
    return trainer


def test_without_monitor_best_is_the_latest_checkpoint_as_in_lightning(tmp_path):
    callback = CheckpointCallback(tmp_path, every_n_train_steps=4)
    trainer = fit([callback], steps=8, val=False)
    assert callback.best_model_path == callback.last_model_path == str(path_of(tmp_path, 8))
    trainer.test(Net(), DataLoader(data(16), batch_size=8), ckpt_path="best")


def test_save_checkpoint_keeps_the_trainers_configured_io(tmp_path):
    """The callback does not switch the Trainer to async saving: save_checkpoint(p) then loading
    p (here with torch.load, what a default Trainer writes) works."""
    trainer = fit([CheckpointCallback(tmp_path / "ckpt", every_n_train_steps=4)], steps=4, val=False)
    trainer.save_checkpoint(tmp_path / "manual.ckpt")
    assert torch.load(tmp_path / "manual.ckpt", weights_only=True)["global_step"] == 4
    fit([], steps=6, val=False, ckpt_path=tmp_path / "manual.ckpt", enable_checkpointing=False)


def test_after_a_resume_from_a_validation_save_the_next_periodic_save_happens(tmp_path):
    """The first save is taken at the end of the first validation (step 6); resumed from it,
    the save due at step 9 must happen, not wait for a validation that never comes."""
    first = CheckpointCallback(tmp_path, monitor="val_loss", every_n_train_steps=3, keep_last=10)
    fit([first], steps=6)
    assert [int(r["step"]) for r in first.stats.records] == [6]
    resumed = CheckpointCallback(tmp_path, monitor="val_loss", every_n_train_steps=3, keep_last=10)
    fit([resumed], steps=9, ckpt_path="last")
    assert steps_in(tmp_path) == [6, 9]


def test_a_save_that_cannot_happen_is_a_warning(tmp_path, caplog):
    """The monitored metric never arrives before training ends: the due save is still taken at
    the end of training, and a WARNING says so."""
    callback = CheckpointCallback(tmp_path, monitor="val_loss", every_n_train_steps=3)
    fit([callback], steps=4, val=False)
    assert set(steps_in(tmp_path)) & {3, 4}
    assert any(r.levelno >= logging.WARNING and "val_loss" in r.getMessage() for r in caplog.records)


def test_ckpt_path_last_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog):
    fit([CheckpointCallback(tmp_path, every_n_train_steps=4)], steps=8, val=False)
    tensors = path_of(tmp_path, 8) / "state.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-64:] = bytes(64)  # flip the tail of the data: the checksum no longer matches
    tensors.write_bytes(bytes(raw))
    trainer = fit(
        [CheckpointCallback(tmp_path, every_n_train_steps=4, overwrite=True)], steps=10, val=False, ckpt_path="last"
    )
    assert trainer.global_step == 10
    assert any(r.levelno == logging.WARNING and "step 8" in r.getMessage() for r in caplog.records)


def test_a_monitor_typo_names_the_logged_metrics(tmp_path, caplog):
    fit([CheckpointCallback(tmp_path, monitor="val_los", every_n_train_steps=6)], steps=12)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "val_los'" in r.getMessage()]
    assert warnings and "val_loss" in warnings[0] and "train_loss" in warnings[0]


class Batches(L.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[0][:, 0].clone())


def test_data_order_is_the_same_as_with_model_checkpoint(tmp_path):
    orders = []
    for checkpoint in (
        ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=4),
        CheckpointCallback(tmp_path / "ours", every_n_train_steps=4),
    ):
        batches = Batches()
        fit([checkpoint, batches], steps=30, val=False)
        orders.append(torch.stack(batches.seen))
    assert torch.equal(orders[0], orders[1])


def _logged(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_per_save_figures_reach_the_loggers_and_one_flag_turns_them_off(tmp_path):
    callback = CheckpointCallback(tmp_path / "ckpt", every_n_train_steps=4)
    fit([callback], val=False, logger=CSVLogger(tmp_path, name="on", version=0))
    rows = _logged(tmp_path / "on" / "version_0" / "metrics.csv")
    for key in ("checkpoint/stall_ms", "checkpoint/durable_s", "checkpoint/bytes"):
        assert sorted(int(r["step"]) for r in rows if r.get(key)) == [4, 8, 12], key
    assert all(float(r["checkpoint/bytes"]) > 0 for r in rows if r.get("checkpoint/bytes"))
    fit(
        [CheckpointCallback(tmp_path / "ckpt2", every_n_train_steps=4, log_metrics=False)],
        val=False,
        logger=CSVLogger(tmp_path, name="off", version=0),
    )
    off = tmp_path / "off" / "version_0" / "metrics.csv"
    assert not off.exists() or not any(k.startswith("checkpoint/") for r in _logged(off) for k in r)
