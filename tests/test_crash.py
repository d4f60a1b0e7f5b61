"""SIGKILL a process that is saving, at random moments, and prove nothing committed is lost.

After every kill: every listed checkpoint verifies and restores, the newest step the child
reported as committed is still there (or a newer one), and leftovers are gone once the next
manager starts. Set CKPT_SOAK=1 for the long version (200 kills per mode).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.cli import main as cli_main

CHILD = Path(__file__).parent / "helpers" / "save_forever.py"
KILLS = 200 if os.environ.get("CKPT_SOAK") else 12


def _run_and_kill(directory: Path, mode: str, rng: random.Random) -> int:
    proc = subprocess.Popen([sys.executable, str(CHILD), str(directory), mode],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    committed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
    return max(committed, default=0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_never_loses_a_committed_checkpoint(tmp_path, mode, capsys):
    rng = random.Random(1234)
    newest_reported = 0
    for trial in range(KILLS):
        reported = _run_and_kill(tmp_path, mode, rng)
        newest_reported = max(newest_reported, reported)
        with CheckpointManager(tmp_path) as mgr:  # cleans leftovers on start
            steps = mgr.steps()
            assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".trash-", ".replaced-"))]
            if newest_reported:
                assert steps and steps[-1] >= newest_reported, (trial, steps, newest_reported)
            for step in steps:
                state = mgr.restore(step)
                assert state["step"] == step
                assert torch.equal(state["model"]["w"], torch.full((512, 1024), float(step)))
        assert cli_main(["verify", str(tmp_path)]) == 0
    capsys.readouterr()
    assert newest_reported > 0, "the child never committed: kills came too early to test anything"
