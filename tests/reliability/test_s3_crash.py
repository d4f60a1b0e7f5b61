"""SIGKILL a process saving to S3 (the moto server) at random moments; nothing committed is lost.

The object-store protocol has no rename: files go under the final prefix and the manifest, one
PUT, is the commit. After every kill: every listed checkpoint restores with verified checksums,
the newest step the child reported as committed is still there (or a newer one), and once the
next writer has started, every prefix left is a committed checkpoint. The kill moments come from
a seeded generator (printed; ``CKPT_KILL_SEED`` replays). 12 kills per mode in ``make test``, 200
with ``CKPT_SOAK=1``. The child finds the endpoint in ``AWS_ENDPOINT_URL``, as a job would.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from test_crash import _start_and_kill

from ckpt_plugins import CheckpointManager
from conftest import HELPERS
from faults import kill_rng

# 8 seeded kills per mode in `make test` (each one a fresh interpreter, about 5.5 s, against a real
# S3 server: the suite's slowest test), 200 in `make soak`; CKPT_KILLS overrides both.
KILLS = int(os.environ.get("CKPT_KILLS", 200 if os.environ.get("CKPT_SOAK") else 8))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_to_s3_never_loses_a_committed_checkpoint(s3_bucket, s3_server, s3_options, mode, capsys):
    rng, seed = kill_rng(f"s3 {mode} save")
    url = f"s3://{s3_bucket}/run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL": s3_server.endpoint}
    client = s3_server.client()
    newest_reported = 0
    for trial in range(KILLS):
        reported = _start_and_kill([([sys.executable, str(HELPERS / "save_forever.py"), url, mode], env)], 1.5, rng)
        newest_reported = max(newest_reported, reported)
        where = f"seed {seed}, trial {trial}"
        with CheckpointManager(url, storage_options=s3_options) as mgr:  # takes the dead child's lock, cleans up
            steps = mgr.steps()
            if newest_reported:
                assert steps and steps[-1] >= newest_reported, (where, steps, newest_reported)
            for step in steps:
                assert mgr.verify(step) == [], (where, step)
                state = mgr.restore(step)
                assert state["step"] == step, where
                assert torch.equal(state["model"]["w"], torch.full((512, 1024), float(step))), where
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="run/").get("Contents", [])]
            prefixes = {k.split("/")[1] for k in keys if k != "run/.lock"}
            assert prefixes == {f"step_{s}" for s in steps}, (where, sorted(prefixes), steps)
    capsys.readouterr()
    assert newest_reported > 0, f"seed {seed}: the child never committed: kills came too early to test anything"


MIRROR_KILLS = int(os.environ.get("CKPT_MIRROR_KILLS", 100 if os.environ.get("CKPT_SOAK") else 0))


@pytest.mark.skipif(not MIRROR_KILLS, reason="soak only (CKPT_SOAK=1): the mirror's kill loop")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_through_a_mirror_never_loses_a_committed_checkpoint(
    s3_bucket, s3_server, s3_options, tmp_path, mode, capsys
):
    """SIGKILL a process saving through ``mirror=`` at random moments (during local commits,
    uploads, remote deletes, trimming). After each kill the next manager on the same mirror ends
    with every committed checkpoint of the newest reported step or later in the store, every
    listed one verifying and restoring, nothing local left that is not uploaded, and no prefix in
    the store that is not a committed checkpoint."""
    rng, seed = kill_rng(f"s3 mirror {mode} save")
    url, local = f"s3://{s3_bucket}/run", tmp_path / "local"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL": s3_server.endpoint}
    client = s3_server.client()
    newest_reported = 0
    for trial in range(MIRROR_KILLS):
        argv = [sys.executable, str(HELPERS / "mirror_child.py"), url, str(local), "0", mode]
        newest_reported = max(newest_reported, _start_and_kill([(argv, env)], 2.0, rng))
        where = f"seed {seed}, trial {trial}"
        with CheckpointManager(url, storage_options=s3_options, mirror=local, keep_local=1, keep_last=3) as mgr:
            mgr.mirror.wait()  # what the dead child left local is uploaded now
            assert mgr.mirror.pending() == [], where
            steps = mgr.steps()
            if newest_reported:
                assert steps and steps[-1] >= newest_reported, (where, steps, newest_reported)
            for step in steps:
                assert mgr.verify(step) == [], (where, step)
                assert mgr.restore(step)["step"] == step, where
            assert not [n for n in os.listdir(local) if n.startswith((".tmp-", ".trash-", ".replaced-"))], where
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="run/").get("Contents", [])]
        prefixes = {k.split("/")[1] for k in keys if k != "run/.lock"}
        assert prefixes == {f"step_{s}" for s in steps}, (where, sorted(prefixes), steps)
    capsys.readouterr()
    assert newest_reported > 0, f"seed {seed}: the child never committed: kills came too early to test anything"
