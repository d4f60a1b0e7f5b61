"""The plugin leaves no thread behind that Lightning's test harness would call a zombie (issue 12):
``trainer.save_checkpoint`` after ``fit()`` never reaches a teardown, so the last asynchronous
save may still be writing when the work ends; every thread it runs on is a daemon with ``stop()``,
which finishes the save, and once the save is durable no thread of ours is left at all."""

from __future__ import annotations

import threading

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

import lightning as L
from ckpt_plugins.lightning import CheckpointIOPlugin
from ckpt_plugins.lightning.saves import wait_for


def _new_threads(before):
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.mark.parametrize("order", ["oldest-first", "newest-first"])
def test_save_checkpoint_after_fit_leaves_only_stoppable_threads_and_none_once_durable(tmp_path, order):
    torch.manual_seed(0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[CheckpointIOPlugin(async_save=True)],
    )
    trainer.fit(BoringModel())
    before = set(threading.enumerate())
    paths = [tmp_path / f"hpc_ckpt_{i}.ckpt" for i in (0, 3, 33)]
    for path in paths:
        trainer.save_checkpoint(path)
    # what Lightning's thread check does at teardown, in either order over the threads it finds
    threads = _new_threads(before)
    for thread in threads if order == "oldest-first" else threads[::-1]:
        assert thread.daemon and callable(getattr(thread, "stop", None)), f"a zombie for Lightning: {thread}"
        thread.stop()
        assert not thread.is_alive()
    for path in paths:
        wait_for(path)
        assert torch.equal(
            CheckpointIOPlugin().load_checkpoint(path)["state_dict"]["layer.weight"],
            trainer.lightning_module.state_dict()["layer.weight"],
        )
    assert not [t for t in _new_threads(before) if t.name.startswith("ckpt")]  # durable: nothing of ours left
