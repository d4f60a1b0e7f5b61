"""CheckpointIOPlugin with a real Trainer and Lightning's own ModelCheckpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins import UnsafeCheckpointError
from ckpt_plugins.files.single_file import is_single_file
from ckpt_plugins.lightning import CheckpointIOPlugin
from ckpt_plugins.storage import LocalStorage
from lightning_train import Net, data


def _fit(dirpath, plugins, steps, ckpt_path=None):
    L.seed_everything(0)
    model = Net()
    callback = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True, every_n_train_steps=4)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        plugins=plugins,
        val_check_interval=6,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        model,
        DataLoader(data(96), batch_size=8, shuffle=True),
        DataLoader(data(32), batch_size=16),
        ckpt_path=ckpt_path,
    )
    return trainer, callback, model


def test_under_model_checkpoint_same_files_our_format_and_resume(tmp_path):
    _, default_cb, default_model = _fit(tmp_path / "default", None, 24)
    trainer, ours_cb, ours_model = _fit(tmp_path / "ours", [CheckpointIOPlugin(async_save=True)], 24)
    names = sorted(os.listdir(tmp_path / "default"))
    assert sorted(os.listdir(tmp_path / "ours")) == names  # save_top_k=2 + last, as before
    assert os.path.basename(ours_cb.best_model_path) == os.path.basename(default_cb.best_model_path)
    for name in names:  # every checkpoint is one committed file in our format
        assert is_single_file(LocalStorage(), str(tmp_path / "ours" / name))
    assert all(
        torch.equal(a, b)
        for a, b in zip(default_model.state_dict().values(), ours_model.state_dict().values(), strict=False)
    )

    loaded = trainer.strategy.checkpoint_io.load_checkpoint(tmp_path / "ours" / "last.ckpt")
    reference = torch.load(tmp_path / "default" / "last.ckpt", weights_only=True)
    assert loaded["global_step"] == reference["global_step"] == 24
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in reference["state_dict"].items())

    _, _, resumed_default = _fit(tmp_path / "default", None, 30, ckpt_path="last")
    trainer, _, resumed_ours = _fit(tmp_path / "ours", [CheckpointIOPlugin()], 30, ckpt_path="last")
    assert trainer.global_step == 30
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "default"))
    assert all(
        torch.equal(a, b)
        for a, b in zip(resumed_default.state_dict().values(), resumed_ours.state_dict().values(), strict=False)
    )


class Opaque:  # a class torch's weights_only loader does not allow
    def __init__(self, value):
        self.value = value


def test_load_reads_lightning_ckpt_weights_only_and_refuses_unsafe_pickle(tmp_path):
    plugin = CheckpointIOPlugin()
    plain = {"state_dict": {"w": torch.ones(2)}, "global_step": 3, "hyper_parameters": {"path": Path("/x")}}
    torch.save(plain, tmp_path / "plain.ckpt")
    loaded = plugin.load_checkpoint(tmp_path / "plain.ckpt")
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    torch.save({**plain, "hyper_parameters": {"thing": Opaque(1)}}, tmp_path / "unsafe.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="Opaque"):
        plugin.load_checkpoint(tmp_path / "unsafe.ckpt")
    assert plugin.load_checkpoint(tmp_path / "unsafe.ckpt", weights_only=False)["hyper_parameters"]["thing"].value == 1
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")
    plugin.teardown()


def test_remove_runs_after_pending_saves_and_teardown_flushes(tmp_path):
    plugin = CheckpointIOPlugin(async_save=True)
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 1}, tmp_path / "old.ckpt")
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(20_000_000)}, "global_step": 2}, tmp_path / "new.ckpt")
    plugin.remove_checkpoint(tmp_path / "old.ckpt")  # queued behind the pending save, returns at once
    assert (tmp_path / "old.ckpt").is_file() and (tmp_path / "new.ckpt").is_file()  # new.ckpt: reserved
    plugin.teardown()
    assert sorted(os.listdir(tmp_path)) == ["new.ckpt"]  # the hidden temporary file is gone too
    assert torch.equal(
        CheckpointIOPlugin().load_checkpoint(tmp_path / "new.ckpt")["state_dict"]["w"], torch.ones(20_000_000)
    )


def test_hidden_names_are_lightning_files_removed_as_files(tmp_path):
    """Lightning's spawn launchers save ``.temp.ckpt`` through the IO and remove it with fs.rm."""
    plugin = CheckpointIOPlugin()
    plugin.save_checkpoint({"w": torch.ones(3)}, tmp_path / ".temp.ckpt")
    assert (tmp_path / ".temp.ckpt").is_file()
    assert torch.equal(plugin.load_checkpoint(tmp_path / ".temp.ckpt")["w"], torch.ones(3))
    plugin.remove_checkpoint(tmp_path / ".temp.ckpt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.ckpt")
    plugin.remove_checkpoint(tmp_path / "plain.ckpt")
    plugin.teardown()
    assert os.listdir(tmp_path) == []


def test_options_are_checked_with_the_option_named():
    with pytest.raises(ValueError, match="max_pending"):
        CheckpointIOPlugin(max_pending=0)
    with pytest.raises(ValueError, match="on_error"):
        CheckpointIOPlugin(on_error="ignore")
    with pytest.raises(ValueError, match="storage_options"):
        CheckpointIOPlugin().save_checkpoint({}, "x.ckpt", storage_options="endpoint=http://x")
    with pytest.raises(ValueError, match="storage_options"):
        CheckpointIOPlugin(storage_options=["key"])
