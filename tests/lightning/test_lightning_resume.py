"""Bit-exact resume with a real Lightning Trainer: a run SIGKILLed at a random step and resumed
with ``ckpt_path="last"`` ends with exactly the parameters of an uninterrupted run.

The killed run is a real child process (it kills itself, or under DDP its whole process group,
with SIGKILL, possibly while a save is in flight). Reference and resumed runs run in this process
(under DDP through Lightning's ``ddp_fork`` launcher: two forked ranks, gloo), which keeps the
suite fast; the killed DDP run uses Lightning's subprocess launcher (``strategy="ddp"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_train
from conftest import HELPERS
from faults import kill_rng
from lightning_names import path_of, steps_in

SCRIPT = HELPERS / "lightning_train.py"


def _killed_run(args: list[str], timeout: float = 180) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    assert proc.returncode == -9, (
        f"expected SIGKILL, got {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _assert_same(reference: Path, resumed: Path, context: str) -> None:
    a, b = load_file(str(reference)), load_file(str(resumed))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{context}: parameters differ from the uninterrupted run: {different}"


@pytest.mark.parametrize("loader", ["plain", "seeded", "stateful"])
def test_sigkill_and_resume_is_bit_exact(tmp_path, loader):
    """Single process; 12 batches per epoch, saves every 4 steps (some end an epoch), killed at a
    random step. Loaders: ``DataLoader(shuffle=True)``, the same with its own generator, and
    torchdata's ``StatefulDataLoader``."""
    rng, seed = kill_rng("lightning run")
    die_at = rng.randrange(5, 27)
    common = ["--steps", "30", "--every", "4", "--loader", loader]
    lightning_train.run(["--dir", str(tmp_path / "ref"), *common, "--out", str(tmp_path / "ref.safetensors")])
    _killed_run(["--dir", str(tmp_path / "run"), *common, "--die-at", str(die_at)])
    committed = steps_in(tmp_path / "run")
    summary = lightning_train.run(
        ["--dir", str(tmp_path / "run"), *common, "--resume", "--out", str(tmp_path / "resumed.safetensors")]
    )
    _assert_same(
        tmp_path / "ref.safetensors",
        tmp_path / "resumed.safetensors",
        f"{loader} loader, seed {seed}, killed at step {die_at} with {committed} committed",
    )
    assert summary["last"].endswith("step=28.ckpt")
    assert steps_in(tmp_path / "run") == [24, 28]  # keep_last=2


def test_resume_with_validation_and_monitor_is_bit_exact(tmp_path):
    """Validation every 6 batches, best by val_loss: saves due right before a validation are taken
    at its end, saves before the first validation wait for it; the resumed run saves at the same
    steps as the uninterrupted one."""
    rng, seed = kill_rng("lightning run")
    die_at = rng.randrange(8, 26)
    common = ["--steps", "30", "--every", "4", "--val"]
    reference = lightning_train.run(
        ["--dir", str(tmp_path / "ref"), *common, "--out", str(tmp_path / "ref.safetensors")]
    )
    _killed_run(["--dir", str(tmp_path / "run"), *common, "--die-at", str(die_at)])
    resumed = lightning_train.run(
        ["--dir", str(tmp_path / "run"), *common, "--resume", "--out", str(tmp_path / "resumed.safetensors")]
    )
    _assert_same(
        tmp_path / "ref.safetensors", tmp_path / "resumed.safetensors", f"seed {seed}, killed at step {die_at}"
    )
    assert reference["saved"][0] == 6  # due at 4, deferred to the first validation
    assert [s for s in reference["saved"] if s > min(resumed["saved"]) - 1] == resumed["saved"]


@pytest.mark.slow
def test_ddp_two_processes_sigkill_and_resume_is_bit_exact(tmp_path):
    """DDP x2 on CPU (gloo): 6 batches per rank and epoch, per-rank RNG and data position."""
    rng, seed = kill_rng("lightning run")
    die_at = rng.randrange(5, 18)
    common = ["--steps", "20", "--every", "4", "--ddp"]
    lightning_train.run(
        ["--dir", str(tmp_path / "ref"), *common, "--strategy", "ddp_fork", "--out", str(tmp_path / "ref.safetensors")]
    )
    _killed_run(["--dir", str(tmp_path / "run"), *common, "--strategy", "ddp", "--die-at", str(die_at)])
    lightning_train.run(
        [
            "--dir",
            str(tmp_path / "run"),
            *common,
            "--strategy",
            "ddp_fork",
            "--resume",
            "--out",
            str(tmp_path / "resumed.safetensors"),
        ]
    )
    _assert_same(
        tmp_path / "ref.safetensors", tmp_path / "resumed.safetensors", f"DDP, seed {seed}, killed at step {die_at}"
    )
    kept = steps_in(tmp_path / "run")
    assert kept == [16, 20]
    assert sorted(os.listdir(path_of(tmp_path / "run", 20))) == [
        "manifest.json",
        "rank_0.safetensors",
        "rank_1.safetensors",
        "state.safetensors",
    ]
