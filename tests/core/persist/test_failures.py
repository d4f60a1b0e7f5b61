"""Failure paths that must neither hang nor leak.

* The writer (thread or process) failing outside one save's own work fails every pending handle
  with that error, and the manager refuses later saves with it; close() and interpreter exit
  return.
* A failure after the directory lock was taken releases the lock.

Hang tests run the scenario in a child process with a timeout: a hang is a timeout there, never a
wall-clock assertion here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ckpt_plugins import CheckpointManager, SaveError

WRITER_THREAD_DIES = r"""
import sys, threading, torch
from ckpt_plugins import CheckpointManager, SaveError

mgr = CheckpointManager(sys.argv[1], async_save=True, max_pending=2)
engine = type(mgr._persister.engine)
both_queued = threading.Event()

def broken_start(self):
    both_queued.wait(60)
    raise RuntimeError("injected writer-thread fault")

engine._lower_priority = broken_start  # the first thing the writer thread runs, outside any job
first = mgr.save(1, {"w": torch.ones(4)})
second = mgr.save(2, {"w": torch.ones(4)})
both_queued.set()
for handle in (first, second):
    try:
        handle.wait(timeout=30)
    except SaveError as exc:
        print("wait raised:", exc, flush=True)
    except TimeoutError:
        print("wait timed out", flush=True)
try:
    mgr.save(3, {"w": torch.ones(4)})
except SaveError as exc:
    print("save refused:", exc, flush=True)
mgr.close()  # the failure was reported: close returns (and so does interpreter exit)
print("closed", flush=True)
"""


def test_writer_thread_failure_fails_every_pending_handle_and_refuses_saves(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WRITER_THREAD_DIES, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    kinds = [line.split(":")[0] for line in lines]
    assert kinds == ["wait raised", "wait raised", "save refused", "closed"], proc.stdout
    assert all("injected writer-thread fault" in line for line in lines[:3]), proc.stdout
    assert not (tmp_path / ".lock").exists()
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == []


def _wait_dead(pid: int) -> None:
    for _ in range(6000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die")


def test_writer_process_death_fails_every_pending_handle_and_refuses_saves(tmp_path):
    """A SIGKILLed writer process (the OOM killer's way) is not silently replaced: the saves that
    were waiting for it fail, and so does every later one, with the same error."""
    state = {"w": torch.randn(256, 256)}
    mgr = CheckpointManager(tmp_path, async_save=True, writer="process", max_pending=2)
    try:
        mgr._persister.process_writer.wait_ready()  # before that, the writer thread writes (start-up is not waited for)
        mgr.save(1, state).wait()
        pid = mgr._persister.process_writer._proc.pid
        os.kill(pid, signal.SIGSTOP)  # both saves below are queued while it cannot answer
        second = mgr.save(2, state)
        third = mgr.save(3, state)
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        for handle in (second, third):
            with pytest.raises(SaveError, match="writer process died"):
                handle.wait(timeout=120)
        with pytest.raises(SaveError, match="writer process died"):
            mgr.save(4, state)
    finally:
        mgr.close()
    assert not (tmp_path / ".lock").exists()
    with CheckpointManager(tmp_path) as again:
        assert again.steps() == [1] and again.verify(1) == []


def test_a_failure_after_the_lock_is_taken_releases_it(tmp_path):
    """``cleanup_leftovers`` failing (here: the checkpoint it must put back is shadowed by a
    dangling link, so the rename fails) used to leave this process holding the lock."""
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, {"a": torch.ones(2)})
    os.rename(tmp_path / "step_5", tmp_path / ".replaced-step_5-0123456789ab")
    os.symlink(tmp_path / "nowhere", tmp_path / "step_5")
    with pytest.raises(OSError):
        CheckpointManager(tmp_path)
    assert not (tmp_path / ".lock").exists()
    os.remove(tmp_path / "step_5")
    with CheckpointManager(tmp_path) as mgr:  # not LockedError naming this very process
        assert mgr.steps() == [5]
        assert torch.equal(mgr.restore(5)["a"], torch.ones(2))
