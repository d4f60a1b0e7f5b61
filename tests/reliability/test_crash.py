"""SIGKILL a process that is saving, at random moments, and prove nothing committed is lost.

After every kill: every listed checkpoint verifies and restores, the newest step the child
reported as committed is still there (or a newer one), and leftovers are gone once the next
manager starts. Set CKPT_SOAK=1 for the long version (200 kills per mode). The kill moments come
from a seeded generator; the seed is printed and in every assertion message, and
CKPT_KILL_SEED=<seed> replays it.
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
from conftest import HELPERS
from faults import kill_rng
from ports import free_port

CHILD = HELPERS / "save_forever.py"
DIST_CHILD = HELPERS / "save_forever_dist.py"
KILLS = int(os.environ.get("CKPT_KILLS", 200 if os.environ.get("CKPT_SOAK") else 12))
DIST_KILLS = int(os.environ.get("CKPT_KILLS", 200 if os.environ.get("CKPT_SOAK") else 4))


def _start_and_kill(commands: list[tuple[list[str], dict]], pause: float, rng: random.Random) -> int:
    """Start every process, wait until each is ready, SIGKILL them all at once after a random
    pause, and return the newest step the first one reported as committed."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) for argv, env in commands]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, pause))
    for proc in procs:  # the whole job dies at once, as when a node is lost
        proc.send_signal(signal.SIGKILL)
    outputs = [proc.communicate()[0] for proc in procs]
    committed = [int(line.split()[1]) for line in outputs[0].splitlines() if line.startswith("committed")]
    return max(committed, default=0)


def _run_and_kill(directory: Path, mode: str, rng: random.Random) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return _start_and_kill([([sys.executable, str(CHILD), str(directory), mode], env)], 0.4, rng)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_never_loses_a_committed_checkpoint(tmp_path, mode, capsys):
    rng, seed = kill_rng(f"{mode} save")
    newest_reported = 0
    for trial in range(KILLS):
        reported = _run_and_kill(tmp_path, mode, rng)
        newest_reported = max(newest_reported, reported)
        with CheckpointManager(tmp_path) as mgr:  # cleans leftovers on start
            steps = mgr.steps()
            assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".trash-", ".replaced-"))]
            if newest_reported:
                assert steps and steps[-1] >= newest_reported, (seed, trial, steps, newest_reported)
            for step in steps:
                state = mgr.restore(step)
                assert state["step"] == step
                assert torch.equal(state["model"]["w"], torch.full((512, 1024), float(step)))
        if steps:  # verify exits 1 on a directory with nothing committed yet (a kill before the first commit)
            code = cli_main(["verify", str(tmp_path)])
            assert code == 0, f"seed {seed}, trial {trial}: ckpt-plugins verify says\n{capsys.readouterr().out}"
    capsys.readouterr()
    assert newest_reported > 0, f"seed {seed}: the child never committed: kills came too early to test anything"


def _run_two_ranks_and_kill(directory: Path, mode: str, rng: random.Random) -> int:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    argv = [sys.executable, str(DIST_CHILD), str(directory), mode]
    return _start_and_kill([(argv, {**env, "RANK": str(rank)}) for rank in (0, 1)], 1.0, rng)


@pytest.mark.parametrize("mode", ["sync", "async", "sharded"])
def test_sigkill_of_a_two_rank_job_never_loses_a_committed_checkpoint(tmp_path, mode, capsys):
    rng, seed = kill_rng(f"two ranks, {mode} save")
    newest_reported = 0
    for trial in range(DIST_KILLS if mode != "sharded" or os.environ.get("CKPT_SOAK") else 2):
        newest_reported = max(newest_reported, _run_two_ranks_and_kill(tmp_path, mode, rng))
        with CheckpointManager(tmp_path) as mgr:
            steps = mgr.steps()
            if newest_reported:
                assert steps and steps[-1] >= newest_reported, (seed, trial, steps, newest_reported)
            for step in steps:
                assert mgr.verify(step) == [], f"seed {seed}, trial {trial}"
                assert mgr.restore(step)["step"] == step
                assert mgr.restore_rank_state(step, rank=1)["rank"] == 1
                if mode == "sharded":  # each rank's rows, from its own shard file
                    assert torch.equal(mgr.restore(step)["model"]["w"], torch.full((512, 1024), float(step)))
    capsys.readouterr()
    assert newest_reported > 0, f"seed {seed}"
