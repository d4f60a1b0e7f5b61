"""Two real gloo ranks with ring peers: a rank whose memory is lost (its host, simulated by wiping its
shared-memory folder) recovers its snapshot from its peer, and both ranks restore the same step."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.memory.hooks import complete_step
from conftest import HELPERS
from memory_train import make, train_to

CHILD = HELPERS / "memory_train_dist.py"


def _ranks(directory, *args: str) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    argv = [sys.executable, str(CHILD), str(directory), *args]
    return [
        subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "PYTHONUNBUFFERED": "1"})
        for r in (0, 1)
    ]


def test_a_rank_that_lost_its_memory_recovers_from_its_peer(tmp_path, shm_of):
    shm = shm_of(tmp_path)
    procs = _ranks(tmp_path, "train", "7")
    assert [p.stdout.readline().strip() for p in procs] == ["held 7", "held 7"]
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    shutil.rmtree(os.path.join(shm, "rank1"))  # rank 1's host is gone: its snapshots and its copy of rank 0's

    procs = _ranks(tmp_path, "resume", "9")
    lines = [p.stdout.readline().split() for p in procs]
    for p in procs:
        assert p.wait(timeout=120) == 0
    # both ranks restored step 7 from memory (rank 1 from the copy rank 0 held), each its own rank state
    assert [(int(step), source.startswith(shm), int(marker)) for _, step, source, marker in lines] == [
        (7, True, 0),
        (7, True, 1),
    ]
    assert not os.path.exists(shm)  # a normal end frees the memory on every rank
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [5, 9]  # step 9, newer than the directory, was persisted at close()
        model, opt = make()
        mgr.restore("latest", target={"model": model, "optimizer": opt})
        ref, _, _ = train_to(9)
        for key, value in ref.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        assert int(mgr.restore_rank_state(9, rank=1)["marker"][0]) == 1


def test_the_ranks_agree_on_the_newest_step_complete_in_memory():
    # (own steps, steps of the copy of rank q-1) per rank q
    assert complete_step([([7, 6], [7, 6]), ([7, 6], [7, 6])]) == (7, {})
    assert complete_step([([7, 6], [7, 6]), ([], [])]) == (7, {1: 0})  # rank 1 lost its memory
    assert complete_step([([7, 6], [6]), ([], [])]) == (6, {1: 0})  # the copy of 7 had not arrived
    assert complete_step([([7], []), ([], [])]) == (None, {})  # nothing complete: the directory
    assert complete_step([([9], [8]), ([8], [9]), ([9], [9])]) == (9, {1: 2})
    assert complete_step([([5], [])]) == (5, {})
