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


SOAK = pytest.mark.skipif(not os.environ.get("CKPT_SOAK"), reason="CKPT_SOAK=1 (make soak): the DDP run covers it")


@pytest.mark.parametrize(
    "ddp", [pytest.param(False, marks=SOAK), pytest.param(True, marks=pytest.mark.slow)], ids=["single", "ddp2"]
)
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
