"""Save on preemption with a real ``transformers.Trainer``: SIGTERM between two periodic saves.

The preempted run is a real process (one, or two ranks under ``torchrun``, gloo) running
``helpers/hf_train.py`` with saves every 4 steps; once the child says step 6 has ended, the test
sends SIGTERM (under torchrun to the agent, which forwards it to the ranks, as SLURM and
Kubernetes deliver it to every process). The run must save step 7 (the agreed boundary), stop,
and end with SIGTERM; the resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_train
from conftest import HELPERS
from signal_child import signal_when_ready

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)

SCRIPT = HELPERS / "hf_train.py"
ENV = {**os.environ, "CKPT_HF_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _preempted(command: list[str], at: int) -> tuple[int, str, str]:
    code, lines, err = signal_when_ready([*command, "--await-signal-at", str(at), "--sync-every", "1"], at, ENV)
    return code, "".join(lines), err


def _checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n[11:]))


def test_sigterm_between_saves_saves_that_step_stops_and_resumes_bit_exact(tmp_path):
    out, steps = tmp_path / "run", 12
    rc, stdout, err = _preempted([sys.executable, str(SCRIPT), str(out), "--steps", str(steps)], at=6)
    assert rc == -signal.SIGTERM, f"exit {rc}\n{stdout[-2000:]}\n{err[-4000:]}"
    assert "PREEMPTED_AT 7 STEP 7" in stdout, stdout[-2000:]
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-7"]
    resumed = hf_train.make_trainer(out, steps, callback={})
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == steps
    reference = hf_train.make_trainer(tmp_path / "reference", steps, save_strategy="no")
    reference.train()
    expected, got = hf_train.trainable_state(reference), hf_train.trainable_state(resumed)
    assert not [k for k in expected if not torch.equal(expected[k], got[k])]


@pytest.mark.slow
def test_torchrun_two_ranks_sigterm_saves_the_step_both_ranks_agreed_on(tmp_path):
    """The fast DDP x2 case (one torchrun launch; the resume is the soak test's): the signal goes
    to the agent, which forwards it to both ranks; both stop at step 7 with one checkpoint holding
    both ranks' files, and no rank goes on training."""
    out, steps = tmp_path / "run", 12
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    rc, stdout, err = _preempted([*launch, str(out), "--steps", str(steps)], at=6)
    assert rc != 0, f"a preempted torchrun job must not report success\n{stdout[-2000:]}\n{err[-3000:]}"
    assert "PREEMPTED_AT 7 STEP 7" in stdout, f"exit {rc}\n{stdout[-2000:]}\n{err[-4000:]}"
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-7"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "manifest.json"} <= set(os.listdir(out / "checkpoint-7"))
    assert json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())["global_step"] == 7


@pytest.mark.skipif(not os.environ.get("CKPT_SOAK"), reason="CKPT_SOAK=1 (make soak): two torchrun launches, ~45 s")
def test_torchrun_two_ranks_sigterm_saves_the_agreed_step_and_resumes_bit_exact(tmp_path):
    out, reference, steps = tmp_path / "run", tmp_path / "reference", 12
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    rc, stdout, err = _preempted([*launch, str(out), "--steps", str(steps)], at=6)
    assert "PREEMPTED_AT 7 STEP 7" in stdout, f"exit {rc}\n{stdout[-2000:]}\n{err[-4000:]}"
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-7"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "manifest.json"} <= set(os.listdir(out / "checkpoint-7"))
    resumed = subprocess.run(
        [
            *launch,
            str(out),
            "--steps",
            str(steps),
            "--resume",
            "--final",
            str(tmp_path / "resumed.safetensors"),
            "--reference",
            str(reference),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    expected, got = load_file(reference / "final.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert not [k for k in expected if not torch.equal(expected[k], got[k])]
