"""DDP x2 on CPU (gloo) with a real Trainer: a rank that fails during a save stops every rank
with a clear error, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import HELPERS
from lightning_names import steps_in

SCRIPT = HELPERS / "lightning_train.py"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_rank_failing_to_write_stops_every_rank_with_the_cause(tmp_path):
    """Rank 1 cannot write its file at the second save (injected ENOSPC). Lightning's subprocess
    launcher runs each rank as its own process, so each one must find out by itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--dir",
            str(tmp_path),
            "--steps",
            "20",
            "--every",
            "4",
            "--ddp",
            "--strategy",
            "ddp",
            "--fail-rank",
            "1",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=150)
        deadline = time.monotonic() + 30  # rank 1 is not rank 0's child to wait for; it writes its own file
        while not (tmp_path / "error_rank1.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing may be left hanging, whatever happened
        except ProcessLookupError:
            pass
    assert proc.returncode not in (0, None), output[-3000:]
    assert "SaveError" in output and "No space left on device (injected)" in output, output[-3000:]
    for rank in (0, 1):
        text = (tmp_path / f"error_rank{rank}.txt").read_text()
        assert text.startswith("SaveError: an earlier save failed"), (rank, text)
        assert "rank 1" in text and "No space left on device (injected)" in text, (rank, text)
    assert steps_in(tmp_path) == [4]  # the failed save never committed
