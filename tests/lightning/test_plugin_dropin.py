"""CheckpointIOPlugin as a drop-in under Lightning's own ModelCheckpoint (issue 12: R1 to R5,
load_from_checkpoint). Real Trainers on CPU, tiny models; a large buffer makes each background
write take long enough to still be in flight when ``save_checkpoint`` returns."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from lightning_train import Net, data


class BigNet(Net):
    """Net with a 16 MiB buffer: a background write of it is still running when save returns."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)
        self.register_buffer("big", torch.zeros(4 * 1024 * 1024))


def trainer(tmp_path, plugin=None, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs}, plugins=[plugin or CheckpointIOPlugin()])


def train_loader():
    return DataLoader(data(64), batch_size=8, shuffle=True)


def test_r1_a_saved_path_exists_at_once_and_loads_in_a_new_trainer(tmp_path):
    L.seed_everything(0)
    first = trainer(tmp_path, enable_checkpointing=False)
    first.fit(BigNet(), train_loader())
    path = tmp_path / "model.ckpt"
    first.save_checkpoint(path)
    assert os.path.exists(path), "the path handed to save_checkpoint must be reserved when it returns"
    again = trainer(tmp_path, enable_checkpointing=False)  # another plugin: its load waits for the save
    again.validate(BigNet(), DataLoader(data(16), batch_size=8), ckpt_path=path)
    resumed = trainer(tmp_path, enable_checkpointing=False, max_steps=6)
    resumed.fit(BigNet(), train_loader(), ckpt_path=path)
    assert resumed.global_step == 6


def test_r2_versioned_names_of_saves_in_flight_are_not_reused(tmp_path):
    """filename="{epoch}" and a save every 2 steps: Lightning names them epoch=0, epoch=0-v1, ..."""

    def names(plugins):
        L.seed_everything(0)
        directory = tmp_path / ("ours" if plugins else "default")
        callback = ModelCheckpoint(
            dirpath=directory, filename="{epoch}", every_n_train_steps=2, save_top_k=-1, monitor="step", mode="max"
        )
        L.Trainer(
            max_steps=8,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[callback],
            plugins=plugins,
        ).fit(BigNet(), train_loader())
        return sorted(os.listdir(directory))

    expected = names(None)
    assert expected == ["epoch=0-v1.ckpt", "epoch=0-v2.ckpt", "epoch=0-v3.ckpt", "epoch=0.ckpt"]
    assert names([CheckpointIOPlugin()]) == expected


CRASH = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from ckpt_plugins.lightning import CheckpointIOPlugin
    directory = sys.argv[1]
    plugin = CheckpointIOPlugin(async_save=False)
    for step in (33, 34):
        plugin.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": step},
                               os.path.join(directory, f"hpc_ckpt_{step}.ckpt"))
    plugin.teardown()
    plugin = CheckpointIOPlugin()  # replace hpc_ckpt_34.ckpt: written under a hidden name, then renamed
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(50_000_000)}, "global_step": 35},
                           os.path.join(directory, "hpc_ckpt_34.ckpt"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # die while the hidden temporary file is being written
        if any(n.startswith(".") for n in os.listdir(directory)):
            os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(3)
""")


def test_r3_a_leftover_of_a_killed_save_is_not_read_as_a_checkpoint_version(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers, "the child died while its save was in flight"
    for name in leftovers:  # Lightning's HPC scan: any name containing "ckpt_", its digits joined
        assert "ckpt_" not in name and not name.endswith(".ckpt") and "last" not in name, name
    trainer = L.Trainer(logger=False, plugins=[CheckpointIOPlugin()])
    assert trainer._checkpoint_connector._CheckpointConnector__max_ckpt_version_in_folder(tmp_path) == 34
    assert trainer.strategy.checkpoint_io.load_checkpoint(tmp_path / "hpc_ckpt_34.ckpt")["global_step"] == 34


def test_r4_plugin_and_callback_pickle_and_deepcopy_after_saving(tmp_path):
    plugin = CheckpointIOPlugin()
    callback = CheckpointCallback(tmp_path / "cb", every_n_train_steps=2)
    L.seed_everything(0)
    fitted = trainer(tmp_path, plugin, callbacks=[callback])
    fitted.fit(Net(), train_loader())
    fitted.save_checkpoint(tmp_path / "a.ckpt")
    for clone in (copy.deepcopy(plugin), pickle.loads(pickle.dumps(plugin))):
        clone.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, tmp_path / "b.ckpt")
        assert torch.equal(clone.load_checkpoint(tmp_path / "b.ckpt")["state_dict"]["w"], torch.ones(2))
        assert clone.load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 4
        clone.teardown()
    for clone in (copy.deepcopy(callback), pickle.loads(pickle.dumps(callback))):
        assert clone.dirpath == callback.dirpath
    pickle.loads(pickle.dumps(fitted.strategy))  # what ddp_spawn sends to its workers
    plugin.teardown()


def test_r5_save_outside_fit_leaves_nothing_open_for_the_next_trainer(tmp_path):
    L.seed_everything(0)
    first = trainer(tmp_path, enable_checkpointing=False)
    first.fit(Net(), train_loader())
    first.save_checkpoint(tmp_path / "run" / "model.ckpt")  # outside fit: no teardown follows
    callback = CheckpointCallback(tmp_path / "run", every_n_train_steps=2)
    second = L.Trainer(
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )  # the same folder, the same process
    second.fit(Net(), train_loader())
    assert callback.last_model_path.endswith("step=4.ckpt")


@pytest.mark.parametrize("writer", ["plugin", "callback"])
def test_load_from_checkpoint_reads_what_the_plugin_and_the_callback_write(tmp_path, writer):
    L.seed_everything(0)
    model = Net(lr=0.05)
    if writer == "plugin":
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4)
        fitted = trainer(tmp_path, callbacks=[callback])
    else:
        callback = CheckpointCallback(tmp_path / "ckpt", every_n_train_steps=4)
        fitted = L.Trainer(
            max_steps=4,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[callback],
        )
    fitted.fit(model, train_loader())
    path = callback.last_model_path or callback.best_model_path
    loaded = Net.load_from_checkpoint(path)
    assert loaded.hparams.lr == 0.05
    pairs = zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    resumed = trainer(tmp_path, max_steps=6, enable_checkpointing=False)
    resumed.fit(Net(lr=0.05), train_loader(), ckpt_path=path)
    assert resumed.global_step == 6
