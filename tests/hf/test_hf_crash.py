"""SIGKILL a real Trainer run at a random step, resume it, and get the uninterrupted result.

The killed runs are real processes (one, and two under ``torchrun`` with gloo) running
``helpers/hf_train.py`` with ``CheckpointCallback`` (async saves every 4 steps); the kill comes at
the end of a random step, often while a save is still being written. The resumed run uses
``trainer.train(resume_from_checkpoint=True)`` and must end with the same parameters, bit for
bit, as a run that was never interrupted (same seed). The step is random on purpose; set
``CKPT_HF_KILL_SEED`` to replay a failure (the seed is in the assertion message).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

import hf_train
from conftest import HELPERS

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)

SCRIPT = HELPERS / "hf_train.py"
ENV = {**os.environ, "CKPT_HF_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kill_step(low: int, high: int) -> tuple[int, int]:
    seed = int(os.environ.get("CKPT_HF_KILL_SEED", time.time_ns() % 2**32))
    return random.Random(seed).randint(low, high), seed


def assert_only_committed(out: Path) -> None:
    """Every ``checkpoint-*`` folder is complete; anything in flight stayed hidden."""
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            assert (out / name / "manifest.json").is_file(), f"{name} is visible but was never committed"


def test_sigkill_at_random_step_then_resume_is_bit_exact(tmp_path):
    steps, (kill_at, seed) = 16, kill_step(5, 15)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--steps", str(steps), "--kill-at", str(kill_at)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, f"seed {seed}: the run was not SIGKILLed:\n{proc.stderr[-3000:]}"
    assert_only_committed(out)
    newest = get_last_checkpoint(str(out))
    assert newest is not None and int(newest.rsplit("-", 1)[1]) < steps

    resumed = hf_train.make_trainer(out, steps, callback={})
    resumed.train(resume_from_checkpoint=True)
    reference = hf_train.make_trainer(tmp_path / "reference", steps, save_strategy="no")
    reference.train()
    expected, got = hf_train.trainable_state(reference), hf_train.trainable_state(resumed)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"seed {seed} (killed after step {kill_at}, resumed from {newest}): {different[:3]}"


@pytest.mark.slow
def test_torchrun_two_ranks_sigkill_then_resume_is_bit_exact(tmp_path):
    steps, (kill_at, seed) = 12, kill_step(5, 11)
    out, reference = tmp_path / "run", tmp_path / "reference"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        str(out),
        "--steps",
        str(steps),
    ]
    killed = subprocess.run([*launch, "--kill-at", str(kill_at)], env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0, f"seed {seed}: the ranks were not killed:\n{killed.stderr[-3000:]}"
    assert "Signals.SIGKILL" in killed.stderr or "-9" in killed.stderr, killed.stderr[-3000:]
    assert_only_committed(out)
    newest = Path(get_last_checkpoint(str(out)))
    assert {"rng_state_0.pth", "rng_state_1.pth", "manifest.json"} <= set(os.listdir(newest))

    resumed = subprocess.run(
        [*launch, "--resume", "--final", str(tmp_path / "resumed.safetensors"), "--reference", str(reference)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    expected, got = load_file(reference / "final.safetensors"), load_file(tmp_path / "resumed.safetensors")
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"seed {seed} (killed after step {kill_at}, resumed from {newest.name}): {different[:3]}"
