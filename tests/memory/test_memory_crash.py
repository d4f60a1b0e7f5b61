"""SIGKILL of a training loop that snapshots every step: the restart resumes from memory.

The child (tests/helpers/memory_train.py) saves every step (memory) and persists every 5th; the
parent kills it with SIGKILL after a seeded random number of reported saves. A new manager on the
same directory must restore a step at least as new as the last one whose save() returned, equal
bit for bit (model, optimizer, RNG) to a fresh rerun to that step. With the shared memory wiped
(what losing the host does), it falls back to the newest durable checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import torch

from ckpt_plugins import CheckpointManager, restore_rng
from conftest import HELPERS
from faults import kill_rng
from memory_train import make, train_to

CHILD = HELPERS / "memory_train.py"
KILLS = int(os.environ.get("CKPT_KILLS", 30 if os.environ.get("CKPT_SOAK") else 1))


def _run_until_killed(directory, after: int, *flags: str) -> tuple[int, int]:
    """Start the child, SIGKILL it once it reported ``after`` saves; (its start, its last saved step)."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), "--persist", "5", *flags],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    start = int(proc.stdout.readline().split()[1])
    last = start
    for _ in range(after):
        last = int(proc.stdout.readline().split()[1])
    proc.send_signal(signal.SIGKILL)  # while it goes on saving the next steps
    proc.communicate()
    return start, last


def _assert_equals_rerun(mgr, step):
    model, opt = make()
    mgr.restore("latest", target={"model": model, "optimizer": opt})
    assert mgr.restored_step == step
    ref_model, ref_opt, ref_rng = train_to(step)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    got, want = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for i in want:
        for name in want[i]:
            assert torch.equal(torch.as_tensor(got[i][name]), torch.as_tensor(want[i][name])), (i, name)
    rng = mgr.restore_rank_state(step)["rng"]
    assert torch.equal(rng["torch"], ref_rng["torch"])
    restore_rng(rng)


def test_sigkill_resumes_from_memory_bit_for_bit_and_from_disk_once_the_memory_is_gone(tmp_path, shm_of):
    rng, seed = kill_rng("memory tier")
    shm = shm_of(tmp_path)
    for trial in range(KILLS):
        start, last = _run_until_killed(tmp_path, rng.randint(6, 14))
        assert os.path.isdir(shm), "the snapshots must outlive the killed process"
        # read_only: look without persisting or freeing, so the next trial's child resumes from memory too
        with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5, read_only=True) as mgr:
            latest = mgr.latest_step()
            assert latest is not None and latest >= last > start, (seed, trial, latest, last)
            _assert_equals_rerun(mgr, latest)
            assert mgr.last_restore_report.source.startswith(shm), mgr.last_restore_report.source
    shutil.rmtree(shm)  # the host's memory is gone (what losing the host does): the directory is what is left
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5) as mgr:
        durable = mgr.steps()[-1]
        assert durable % 5 == 0 and durable <= last, (seed, durable, last)
        assert mgr.latest_step() == durable
        _assert_equals_rerun(mgr, durable)
        assert mgr.last_restore_report.source.startswith(str(tmp_path))
    assert not os.path.exists(shm)


def test_overlap_mode_sigkill_restores_at_least_the_last_completed_snapshot_bit_for_bit(tmp_path, shm_of):
    # The snapshot is written on the writer while the next step's forward and backward run; the loop
    # waits for it before optimizer.step(). A kill at any moment restores at least the last snapshot
    # known complete ("snapshot N": wait_for_snapshot() returned), hence at least one step before
    # the last save() that returned, and equals a rerun to the step it restores.
    rng, seed = kill_rng("memory tier overlap")
    shm = shm_of(tmp_path)
    for trial in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path), "--persist", "5", "--overlap"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        start = int(proc.stdout.readline().split()[1])
        completed, returned = start, start
        for _ in range(rng.randint(12, 28)):
            kind, step = proc.stdout.readline().split()
            if kind == "snapshot":
                completed = int(step)
            else:
                returned = int(step)
        proc.send_signal(signal.SIGKILL)  # while it trains and snapshots on
        proc.communicate()
        assert completed > start and returned >= completed, (seed, trial, completed, returned)
        with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5, read_only=True) as mgr:
            latest = mgr.latest_step()
            assert latest is not None and latest >= completed and latest >= returned - 1, (seed, trial, latest)
            _assert_equals_rerun(mgr, latest)
            assert mgr.last_restore_report.source.startswith(shm), mgr.last_restore_report.source
