"""CheckpointCallback names its checkpoints as ModelCheckpoint does (issue 12): ``filename``
templates, ``-vN``, ``save_last``, and the paths Lightning reads (best, last, best_k, kth best);
the same seeded run under ``ModelCheckpoint`` is the reference."""

from __future__ import annotations

import os
from unittest.mock import patch

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins import CheckpointManager
from ckpt_plugins.lightning import CheckpointCallback
from lightning_train import Net, data


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (the shared fixture in tests/conftest.py), for every test here."""


def fit(callback, steps=12, ckpt_path=None):
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        num_sanity_val_steps=0,
        val_check_interval=4,
    )
    with patch.object(trainer, "save_checkpoint", wraps=trainer.save_checkpoint) as saves:
        trainer.fit(
            Net(),
            DataLoader(data(96), batch_size=8, shuffle=True),
            DataLoader(data(32), batch_size=16),
            ckpt_path=ckpt_path,
        )
    return trainer, [os.path.basename(c.args[0]) for c in saves.call_args_list]


def listed(path):
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # the default: epoch={epoch}-step={step}.ckpt
        dict(filename="{epoch}", every_n_train_steps=2),  # taken names get -v1, -v2 (a save still in flight too)
        dict(filename="{epoch:02d}-{val_loss:.2f}", auto_insert_metric_name=False, save_last=True),
    ],
    ids=["default", "versions", "format-spec-and-last"],
)
def test_the_same_names_as_model_checkpoint(tmp_path, options):
    _, ref_saves = fit(ModelCheckpoint(tmp_path / "ref", save_top_k=-1, **options))
    ours, our_saves = fit(CheckpointCallback(tmp_path / "ours", **options))
    assert listed(tmp_path / "ours") == listed(tmp_path / "ref")
    assert our_saves == ref_saves  # trainer.save_checkpoint is called with Lightning's paths, as by ModelCheckpoint
    if options.get("save_last"):
        assert ours.checkpoint_callback.last_model_path == str(tmp_path / "ours" / "last.ckpt")
        assert Net.load_from_checkpoint(ours.checkpoint_callback.last_model_path) is not None


def test_best_last_best_k_and_kth_best_show_the_names(tmp_path):
    options = dict(monitor="val_loss", every_n_train_steps=4)
    reference, _ = fit(ModelCheckpoint(tmp_path / "ref", save_top_k=2, **options))
    callback = CheckpointCallback(tmp_path / "ours", keep_best=2, **options)
    fit(callback)
    ref = reference.checkpoint_callback

    def names(paths):
        return sorted(os.path.basename(p) for p in paths)

    assert names(callback.best_k_models) == names(ref.best_k_models)
    assert os.path.basename(callback.best_model_path) == os.path.basename(ref.best_model_path)
    assert os.path.basename(callback.kth_best_model_path) == os.path.basename(ref.kth_best_model_path)
    assert callback.last_model_path.endswith("step=12.ckpt")
    best = callback.best_model_path
    resumed, _ = fit(CheckpointCallback(tmp_path / "ours", keep_best=2, **options), steps=16, ckpt_path="best")
    assert resumed.ckpt_path == best
    with CheckpointManager(tmp_path / "ours", read_only=True, name_template=callback.name_template()) as mgr:
        assert 16 in mgr.steps() and mgr.path_for(16).endswith("epoch=1-step=16.ckpt")
