"""Save on preemption with a real Lightning Trainer: a run that gets SIGTERM between two periodic
saves saves the step it reached, stops, ends with SIGTERM, and resumes bit-exactly.

The preempted run is a real child process; the test sends SIGTERM once the child says it is
inside step 6 (periodic saves every 4 steps), so the signal lands inside that step: the agreed
boundary is step 7. Under DDP the signal goes to rank 0 only; Lightning's subprocess launcher
gets it forwarded to rank 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_train
from conftest import HELPERS
from signal_child import signal_when_ready

SCRIPT = HELPERS / "lightning_train.py"


def _preempted_run(args: list[str], at: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    code, lines, err = signal_when_ready([sys.executable, str(SCRIPT), *args, "--await-signal-at", str(at)], at, env)
    assert code == -signal.SIGTERM, f"exit {code}\n{''.join(lines)[-3000:]}\n{err[-4000:]}"
    summary = [line for line in lines if line.startswith("SUMMARY ")]
    assert summary, err[-3000:]
    return json.loads(summary[-1][len("SUMMARY ") :])


def _assert_same(reference: Path, resumed: Path, context: str) -> None:
    a, b = load_file(str(reference)), load_file(str(resumed))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"{context}: parameters differ: {different}"


@pytest.mark.parametrize("ddp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["single", "ddp2"])
def test_sigterm_between_saves_saves_that_step_stops_and_resumes_bit_exact(tmp_path, ddp):
    common = ["--steps", "16", "--every", "4", "--sync-every", "1"]
    if ddp:
        common += ["--ddp"]
    fork = ["--strategy", "ddp_fork"] if ddp else []
    run_dir = tmp_path / "run"
    summary = _preempted_run(["--dir", str(run_dir), *common, *(["--strategy", "ddp"] if ddp else [])], at=6)
    assert summary["preempted_at"] == 7
    assert summary["saved"] == [4, 7]
    assert sorted(p.name.split("-")[-1] for p in run_dir.glob("*.ckpt")) == ["step=4.ckpt", "step=7.ckpt"]
    lightning_train.run(["--dir", str(tmp_path / "ref"), *common, *fork, "--out", str(tmp_path / "ref.safetensors")])
    resumed = lightning_train.run(
        ["--dir", str(run_dir), *common, *fork, "--resume", "--out", str(tmp_path / "resumed.safetensors")]
    )
    if not ddp:  # under ddp_fork the ranks' callbacks live in the forked processes
        assert resumed["preempted_at"] is None and resumed["saved"][-1] == 16
    _assert_same(tmp_path / "ref.safetensors", tmp_path / "resumed.safetensors", f"ddp={ddp}")


def test_slurm_auto_requeue_still_runs_after_the_preemption_save(tmp_path):
    """Under SLURM (``SLURMEnvironment(auto_requeue=True)``, detected from the job's variables) the
    requeue signal SIGUSR1 is also a preemption signal: our step-7 checkpoint is committed, and
    Lightning's own handler still writes its ``hpc_ckpt_1.ckpt`` and calls ``scontrol requeue``
    (a stand-in on PATH that records its arguments)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1"}
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["PYTHONWARNINGS"] = "ignore"
    run_dir = tmp_path / "run"
    args = ["--dir", str(run_dir), "--steps", "16", "--every", "4", "--sync-every", "1", "--await-signal-at", "6"]
    code, lines, err = signal_when_ready(
        [sys.executable, str(SCRIPT), *args], 6, env, signum=signal.SIGUSR1, cwd=tmp_path
    )
    assert code == -signal.SIGUSR1, f"exit {code}\n{''.join(lines)[-3000:]}\n{err[-4000:]}"
    summary = json.loads([line for line in lines if line.startswith("SUMMARY ")][-1][len("SUMMARY ") :])
    assert summary["preempted_at"] == 7 and summary["saved"] == [4, 7]
    assert sorted(p.name.split("-")[-1] for p in run_dir.glob("*.ckpt")) == ["step=4.ckpt", "step=7.ckpt"]
    assert record.read_text().split() == ["requeue", "4242"]
    assert list(tmp_path.glob("hpc_ckpt_*.ckpt")), sorted(os.listdir(tmp_path))
