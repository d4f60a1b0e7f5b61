"""Save on preemption in a plain PyTorch loop: ``mgr.preemption_requested()`` (real subprocesses).

The child loop says ``READY`` inside a step and waits for the signal (events, not time); the test
sends it. The loop then saves that step, waits, leaves, and the process ends with the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import ConfigError

LOOP = textwrap.dedent(
    """
    import sys, time, torch
    from ckpt_plugins import CheckpointManager
    from ckpt_plugins.persist.preemption import pending_signal
    mgr = CheckpointManager(sys.argv[1], async_save=True, preemption_signals=[sys.argv[2]])
    w = torch.zeros(1000)
    for step in range(1, 1000):
        w += 1
        if step % 5 == 0:
            mgr.save(step, {"w": w})
        if step == 7:
            print("READY", flush=True)
            while not pending_signal():
                time.sleep(0.01)
        if mgr.preemption_requested(step):
            mgr.save(step, {"w": w})
            mgr.wait()
            print("STOPPED", step, flush=True)
            break
    """
)


@pytest.mark.parametrize("signame", ["SIGUSR1"])  # SIGTERM: the adapters' tests
def test_plain_loop_saves_the_step_reached_and_ends_with_the_signal(tmp_path, signame):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP, str(tmp_path), signame],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "STOPPED 7", err
    assert proc.returncode == -getattr(signal, signame), err
    assert f"preemption: {signame} received; saving at step 7" in err
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [5, 7]
        assert torch.equal(mgr.restore(7)["w"], torch.full((1000,), 7.0))


def test_without_save_on_preemption_nothing_is_watched(tmp_path):
    with CheckpointManager(tmp_path, save_on_preemption=False) as mgr:
        assert mgr.preemption_requested(1) is False
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_handlers_are_given_back_at_close(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.preemption_requested(1) is False
        assert signal.getsignal(signal.SIGUSR1) is not before
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preemption_signals": ["SIGKILL"]},
        {"preemption_signals": []},
        {"preemption_signals": ["TERM"]},
        {"preemption_sync_every": 0},
        {"save_on_preemption": "yes"},
    ],
)
def test_bad_preemption_options_are_config_errors_naming_the_option(tmp_path, kwargs):
    with pytest.raises(ConfigError) as info:
        CheckpointManager(tmp_path / "d", **kwargs)
    assert info.value.option == next(iter(kwargs))
    assert not (tmp_path / "d").exists()
