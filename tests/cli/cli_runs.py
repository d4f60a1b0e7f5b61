"""Real checkpoints for the command-line tests, written by the real core, Lightning and HF code.

Each builder trains a tiny model for a few steps on CPU and returns the run folders; the tests
then run ``ckpt-plugins`` on them (in-process through ``main`` or as ``python -m ckpt_plugins.cli``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ckpt_plugins import CheckpointManager, capture_rng

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))

CLI = [sys.executable, "-m", "ckpt_plugins.cli"]


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m ckpt_plugins.cli ARGS`` as a real process (stdout is a pipe, not a TTY)."""
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=240, **kwargs)


def json_of(*args: str) -> dict:
    """``--json`` output of a read command, parsed (fails on anything but one JSON document)."""
    result = run_cli(*args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def plain_run(directory: Path, **rules) -> Path:
    """Steps 1-4 of a plain loop, with ``capture_rng()`` (numpy arrays) beside model and step."""
    torch.manual_seed(0)
    with CheckpointManager(directory, **rules) as mgr:
        for step, loss in ((1, 0.9), (2, 0.4), (3, 0.6), (4, 0.7)):
            mgr.save(
                step,
                {"model": {"w": torch.randn(4, 4), "b": torch.zeros(4)}, "rng": capture_rng(), "step": step},
                metrics={"loss": loss},
            )
    return directory


def lightning_runs(root: Path) -> dict[str, Path]:
    """Three 12-step Lightning runs, a checkpoint every 4 steps: ``callback`` (our
    CheckpointCallback, step_N folders), ``plugin`` (ModelCheckpoint + CheckpointIOPlugin: our
    folders under Lightning's names) and ``native`` (ModelCheckpoint alone: ``.ckpt`` files)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    import lightning as L
    from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin
    from lightning_train import Net, data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {"callback": root / "callback", "plugin": root / "plugin", "native": root / "native"}
    try:
        for kind, directory in runs.items():
            L.seed_everything(0)
            plugins = [CheckpointIOPlugin(async_save=False)] if kind == "plugin" else None
            if kind == "callback":
                callback = CheckpointCallback(directory, every_n_train_steps=4, keep_last=2, async_save=False)
            else:
                callback = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_train_steps=4)
            trainer = L.Trainer(
                max_steps=12,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[callback],
                plugins=plugins,
                limit_val_batches=0,
                accelerator="cpu",
            )
            trainer.fit(Net(), DataLoader(data(96), batch_size=8))
    finally:
        torch.set_num_threads(threads)
    return runs


def hf_runs(root: Path) -> dict[str, Path]:
    """Three 4-step ``transformers.Trainer`` runs saving every 2 steps: ``full`` (GPT-2 with our
    CheckpointCallback), ``lora`` (the same model with a LoRA adapter) and ``native`` (no callback:
    the Trainer's own checkpoint-N folders)."""
    import hf_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {"full": root / "hf-full", "lora": root / "hf-lora", "native": root / "hf-native"}
    try:
        for kind, directory in runs.items():
            callback = None if kind == "native" else {"async_save": False}
            trainer = hf_train.make_trainer(
                directory, 4, model_kind="lora" if kind == "lora" else "gpt2", callback=callback, save_steps=2
            )
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    return runs
