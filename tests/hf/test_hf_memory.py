"""A real transformers.Trainer with the in-memory tier, SIGKILLed, resumes from memory bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_crash import ENV, SCRIPT, kill_step

import hf_train
from ckpt_plugins import ConfigError
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


def test_sigkill_then_resume_from_memory_is_bit_exact(tmp_path, shm_of):
    steps, (kill_at, seed) = 16, kill_step(5, 14)
    out = tmp_path / "run"
    shm = shm_of(out)
    memory = ["--memory", "1", "--persist", "4"]
    argv = [sys.executable, str(SCRIPT), str(out), "--steps", str(steps), "--kill-at", str(kill_at), *memory]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"seed {seed}: the run was not SIGKILLed:\n{proc.stderr[-3000:]}"
    assert os.path.isdir(shm)

    callback = {"memory_every_n_steps": 1, "persist_every_n_steps": 4}
    resumed = hf_train.make_trainer(out, steps, callback=callback, resume_from_checkpoint="True")
    ckpt = next(c for c in resumed.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    assert ckpt.resume_check.step >= kill_at and ckpt.resume_check.path.startswith(shm), (seed, ckpt.resume_check)
    resumed.train(resume_from_checkpoint=resumed.args.resume_from_checkpoint)  # "True", resolved to the snapshot
    assert ckpt.saves[0].step == ckpt.resume_check.step + 1
    reference = hf_train.make_trainer(tmp_path / "reference", steps, save_strategy="no")
    reference.train()
    expected, got = hf_train.trainable_state(reference), hf_train.trainable_state(resumed)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"seed {seed} (killed after step {kill_at}, resumed from memory): {different[:3]}"
    assert not os.path.exists(shm)  # the end of train() persisted the last snapshot and freed the memory
    assert f"checkpoint-{steps}" in os.listdir(out)


def test_memory_flags_are_checked_and_named_as_flags():
    with pytest.raises(ConfigError) as exc:
        CheckpointArguments(ckpt_memory_every_n_steps=2, ckpt_persist_every_n_steps=3).to_options()
    assert exc.value.option == "--ckpt_persist_every_n_steps"
    options = CheckpointArguments(ckpt_memory_every_n_steps=2, ckpt_persist_every_n_steps=4).to_options()
    assert (options.memory_every_n_steps, options.persist_every_n_steps) == (2, 4)
