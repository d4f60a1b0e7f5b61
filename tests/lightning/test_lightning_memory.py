"""A real Lightning run with the in-memory tier, SIGKILLed, resumes from memory bit for bit."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lightning")

from test_lightning_resume import _assert_same, _killed_run

import lightning_train
from ckpt_plugins import ConfigError
from ckpt_plugins.lightning import CheckpointCallback
from faults import kill_rng
from lightning_names import steps_in


def test_sigkill_and_resume_from_memory_is_bit_exact(tmp_path, shm_of):
    rng, seed = kill_rng("lightning memory tier")
    die_at = rng.randrange(9, 23)  # not a multiple of 8 most of the time: the disk is behind
    common = ["--steps", "24", "--memory", "1", "--persist", "8"]
    lightning_train.run(["--dir", str(tmp_path / "ref"), *common, "--out", str(tmp_path / "ref.safetensors")])
    run = tmp_path / "run"
    shm = shm_of(run)
    _killed_run(["--dir", str(run), *common, "--die-at", str(die_at)])
    assert os.path.isdir(shm)
    resumed = tmp_path / "resumed.safetensors"
    summary = lightning_train.run(["--dir", str(run), *common, "--resume", "--out", str(resumed)])
    assert summary["saved"][0] == die_at + 1, (seed, die_at, summary["saved"][:3])  # resumed at die_at: from memory
    _assert_same(tmp_path / "ref.safetensors", resumed, f"seed {seed}, killed at {die_at}")
    assert not os.path.exists(shm)  # teardown closed the manager: step 24 persisted, memory freed
    assert steps_in(run)[-1] == 24


def test_callback_memory_options_are_checked():
    with pytest.raises(ConfigError) as exc:
        CheckpointCallback("x", memory_every_n_steps=2, persist_every_n_steps=5)
    assert exc.value.option == "persist_every_n_steps" and "multiple" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        CheckpointCallback("x", memory_every_n_steps=2, every_n_train_steps=4)
    assert exc.value.option == "memory_every_n_steps"
    with pytest.raises(ConfigError) as exc:
        CheckpointCallback("x", persist_every_n_steps=4)
    assert exc.value.option == "persist_every_n_steps"
