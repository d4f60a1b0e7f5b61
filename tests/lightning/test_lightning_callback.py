"""CheckpointCallback with a real Lightning Trainer (CPU, in this process)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins import CheckpointManager, StepExistsError, UnsupportedStateError
from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin, read_lightning_checkpoint
from ckpt_plugins.retention.policy import RetentionContext, build_policy
from lightning_names import path_of, steps_in
from lightning_train import Net, data


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (the shared fixture in tests/conftest.py), for every test here."""


def fit(callbacks, steps=24, val=True, model=None, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0)
    model = model or Net()
    trainer = L.Trainer(
        max_steps=steps,
        logger=trainer_kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        val_check_interval=6 if val else None,
        limit_val_batches=None if val else 0,
        **trainer_kwargs,
    )
    trainer.fit(
        model,
        DataLoader(data(96), batch_size=8, shuffle=True),
        DataLoader(data(32), batch_size=16) if val else None,
        ckpt_path=ckpt_path,
    )
    return trainer, model


def test_retention_with_a_validation_metric_keeps_the_right_set_and_best_loads_the_best(tmp_path):
    every = CheckpointCallback(tmp_path / "all", monitor="val_loss", every_n_train_steps=3)
    fit([every])
    records = CheckpointManager(tmp_path / "all", read_only=True, name_template=every.name_template()).records()
    assert [r.step for r in records] == [6, 9, 12, 15, 18, 21, 24]
    expected = build_policy(keep_last=1, keep_best=2, monitor="val_loss").decide(records, RetentionContext(now=1e18))

    callback = CheckpointCallback(
        tmp_path / "kept", keep_last=1, keep_best=2, monitor="val_loss", every_n_train_steps=3
    )
    trainer, model = fit([callback])
    assert trainer.checkpoint_callback is callback
    kept = steps_in(tmp_path / "kept")
    assert kept == sorted(expected.keep)
    best = min((r for r in records if "val_loss" in r.metrics), key=lambda r: r.metrics["val_loss"])
    assert callback.best_model_path == str(path_of(tmp_path / "kept", best.step))
    assert callback.best_model_score.item() == pytest.approx(best.metrics["val_loss"])
    assert callback.last_model_path == str(path_of(tmp_path / "kept", 24))

    trainer.test(model, DataLoader(data(32), batch_size=16), ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == callback.best_model_path
    stored = read_lightning_checkpoint(callback.best_model_path)["state_dict"]
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_a_new_process_resumes_from_best_and_replaces_the_later_steps_with_a_warning(tmp_path, caplog):
    options = dict(keep_best=1, monitor="val_loss", mode="max", every_n_train_steps=6)  # "best" = an early step
    fit([CheckpointCallback(tmp_path, **options)])
    best = CheckpointCallback(tmp_path, **options).best_model_path  # from disk, before any setup
    step = int(Path(best).name.split("step=")[1].split(".")[0])
    assert Path(best).parent == tmp_path and step < 24
    trainer, _ = fit([CheckpointCallback(tmp_path, **options)], steps=step + 6, ckpt_path="best")
    assert trainer.ckpt_path == best and trainer.global_step == step + 6
    assert any(r.levelno == logging.WARNING and "24" in r.getMessage() for r in caplog.records)  # names the later
    assert max(steps_in(tmp_path)) == step + 6  # the later ones were replaced


def test_a_fresh_run_into_a_directory_with_later_checkpoints_fails_before_training(tmp_path):
    fit([CheckpointCallback(tmp_path, every_n_train_steps=4)], steps=8, val=False)
    with pytest.raises(StepExistsError, match=r"ckpt_path='last'") as raised:
        fit([CheckpointCallback(tmp_path, every_n_train_steps=4)], steps=8, val=False)
    assert "steps [4, 8]" in str(raised.value)


def test_missing_monitor_defers_the_save_to_validation_end_and_says_so_once(tmp_path, caplog):
    callback = CheckpointCallback(tmp_path, monitor="val_loss", every_n_train_steps=2, keep_last=10)
    fit([callback], steps=14)
    saved = [int(r["step"]) for r in callback.stats.records]
    assert saved[0] == 6  # due at 2 and 4 before any validation: one save at the end of the first
    assert saved == [6, 8, 10, 12, 14]  # 12 was due right before a validation: taken after it
    deferred = [r for r in caplog.records if "is deferred to the end of the next validation" in r.getMessage()]
    assert len(deferred) == 1 and "'val_loss'" in deferred[0].getMessage()


def test_per_save_figures_come_from_the_save_handles(tmp_path):
    callback = CheckpointCallback(tmp_path / "ckpt", every_n_train_steps=4)
    fit([callback], steps=12, val=False, logger=CSVLogger(tmp_path, name="logs", version=0))
    assert [int(r["step"]) for r in callback.stats.records] == [4, 8, 12]
    assert all(r["durable_s"] > 0 and r["bytes"] > 0 and r["stall_ms"] >= 0 for r in callback.stats.records)


def test_the_trainers_io_is_kept_and_reads_the_callbacks_folders(tmp_path):
    trainer, _ = fit([CheckpointCallback(tmp_path / "a", every_n_train_steps=4)], steps=4, val=False)
    assert type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"
    mine = CheckpointIOPlugin(max_pending=2)
    trainer, _ = fit([CheckpointCallback(tmp_path / "b", every_n_train_steps=4)], steps=4, val=False, plugins=[mine])
    assert trainer.strategy.checkpoint_io is mine
    other = AsyncCheckpointIO()
    trainer, _ = fit(
        [CheckpointCallback(tmp_path / "a", every_n_train_steps=4)],
        steps=8,
        val=False,
        plugins=[other],
        ckpt_path="last",
    )
    assert trainer.strategy.checkpoint_io is other and trainer.global_step == 8


def test_overlap_snapshot_saves_the_same_state_as_safe(tmp_path):
    fit([CheckpointCallback(tmp_path / "safe", every_n_train_steps=4, snapshot="safe")], steps=12, val=False)
    fit([CheckpointCallback(tmp_path / "overlap", every_n_train_steps=4, snapshot="overlap")], steps=12, val=False)
    for step in (4, 8, 12):
        a = read_lightning_checkpoint(path_of(tmp_path / "safe", step))
        b = read_lightning_checkpoint(path_of(tmp_path / "overlap", step))
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        assert torch.equal(
            a["optimizer_states"][0]["state"][0]["exp_avg"], b["optimizer_states"][0]["state"][0]["exp_avg"]
        )


class HoldsAnObject(L.Callback):
    def state_dict(self):
        return {"thing": object()}


def test_an_unstorable_callback_state_fails_naming_the_key_and_its_origin(tmp_path):
    with pytest.raises(UnsupportedStateError, match=r"callbacks.*HoldsAnObject.*thing") as raised:
        fit([CheckpointCallback(tmp_path, every_n_train_steps=4), HoldsAnObject()], steps=4, val=False)
    assert "a callback's state_dict()" in str(raised.value)


class WithObjects(Net):
    def __init__(self, lr: float = 0.01, data_dir: Path = Path("/data"), loss_fn=torch.nn.functional.mse_loss):
        super().__init__(lr)
        self.save_hyperparameters()


def test_hyper_parameters_objects_are_stored_as_plain_values_and_reported_once(tmp_path, caplog):
    fit([CheckpointCallback(tmp_path, every_n_train_steps=2)], steps=6, val=False, model=WithObjects())
    checkpoint = read_lightning_checkpoint(path_of(tmp_path, 6))
    assert checkpoint["hyper_parameters"]["data_dir"] == "/data"
    assert checkpoint["hyper_parameters"]["loss_fn"].startswith("<function mse_loss")
    manifest = CheckpointManager(tmp_path, read_only=True).layout.read_manifest(str(path_of(tmp_path, 6)))
    assert manifest.user_metadata["hyper_parameters_converted"] == {
        "hyper_parameters.data_dir": "pathlib.PosixPath",
        "hyper_parameters.loss_fn": "builtins.function",
    }
    warnings = [r for r in caplog.records if "hyper-parameter 'hyper_parameters.loss_fn'" in r.getMessage()]
    assert len(warnings) == 1  # three saves, one warning


class FailsAtStep5(Net):
    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_save_on_exception_commits_the_current_step(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(
            [CheckpointCallback(tmp_path, every_n_train_steps=4, save_on_exception=True)],
            steps=12,
            val=False,
            model=FailsAtStep5(),
        )
    assert steps_in(tmp_path) == [4, 5]


def test_options_fail_fast_naming_the_option():
    with pytest.raises(ValueError, match="keep_best"):
        CheckpointCallback(keep_best=2)  # no monitor
    with pytest.raises(ValueError, match="every_n_train_steps and every_n_epochs"):
        CheckpointCallback(every_n_train_steps=2, every_n_epochs=1)
    with pytest.raises(ValueError, match="activation checkpointing mode 'sometimes'"):
        CheckpointCallback(gradient_checkpointing="sometimes")


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, [12, 24]),  # no trigger: every epoch (12 batches)
        ({"every_n_epochs": 2}, [24]),
        ({"train_time_interval": 1e-6, "keep_last": 2}, [23, 24]),  # due after every batch
    ],
)
def test_lightning_triggers(tmp_path, options, expected):
    callback = CheckpointCallback(tmp_path, **options)
    fit([callback], steps=24, val=False)
    assert steps_in(tmp_path) == expected
