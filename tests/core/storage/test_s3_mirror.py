"""The local-first tier (``mirror=``) against the real moto server: saves commit locally, are
uploaded in the background, the newest ``keep_local`` stay local, restore prefers the local copy,
retention applies to both sides, and a checkpoint is deleted remotely only after a newer one is
uploaded. A SIGKILL between the local commit and the upload loses nothing: the next manager
uploads it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from ckpt_plugins import CheckpointManager, ConfigError, MirrorOptions
from ckpt_plugins.errors import SaveError
from conftest import HELPERS


def _state(step: int, n: int = 64) -> dict:
    return {"model": {"w": torch.full((n, 32), float(step))}, "step": step}


def _keys(server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _remote_steps(server, bucket: str) -> list[int]:
    return sorted(int(k.split("/")[1][5:]) for k in _keys(server, bucket, "run/") if k.endswith("/manifest.json"))


def _local_steps(local) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(local) if n.startswith("step_"))


def _commit_two_steps_locally_then_sigkill(fault_proxy, url: str, local, *child_args: str) -> None:
    """Run ``mirror_child.py`` (through the fault proxy, whose faults the caller set) until it
    reports steps 1 and 2 committed locally, SIGKILL it, then clear the proxy's faults."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL": fault_proxy.endpoint}
    argv = [sys.executable, str(HELPERS / "mirror_child.py"), url, str(local), "2", *child_args]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "ready"
    lines = [child.stdout.readline().strip() for _ in range(2)]
    assert lines == ["committed 1", "committed 2"], lines
    child.send_signal(signal.SIGKILL)
    child.communicate()
    fault_proxy.faults.clear()


def test_saves_commit_locally_upload_in_the_background_and_keep_the_last_k(s3_bucket, s3_server, s3_options, tmp_path):
    local = tmp_path / "local"
    url = f"s3://{s3_bucket}/run"
    options = dict(mirror=local, keep_local=2, keep_last=3, async_save=True)
    with CheckpointManager(url, storage_options=s3_options, **options) as mgr:
        for step in (1, 2, 3, 4):
            handle = mgr.save(step, _state(step))
            assert handle.wait() == str(local / f"step_{step}")  # committed locally
            assert (local / f"step_{step}" / "manifest.json").exists()
        mgr.mirror.wait()
        assert mgr.mirror.pending() == []
        assert _remote_steps(s3_server, s3_bucket) == [2, 3, 4]  # retention (keep_last=3) on the remote
        assert _local_steps(local) == [3, 4]  # keep_local=2
        assert mgr.steps() == [2, 3, 4]  # the union
        assert mgr.latest_step() == 4
        assert torch.equal(mgr.restore(2)["model"]["w"], torch.full((64, 32), 2.0))  # remote only: downloaded
        assert mgr.verify(2) == [] and mgr.verify(4) == []
    # a new manager (another host: an empty local directory) sees the remote, restores from it
    with CheckpointManager(url, storage_options=s3_options, mirror=tmp_path / "other", keep_last=3) as mgr:
        assert mgr.steps() == [2, 3, 4]
        assert mgr.restore("latest")["step"] == 4
        assert mgr.restored_step == 4


def test_restore_prefers_the_local_copy_and_falls_back_to_the_remote_one_when_it_is_damaged(
    s3_bucket, s3_server, s3_options, tmp_path, caplog, fault_proxy, proxied_options
):
    local = tmp_path / "local"
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options, mirror=local) as mgr:
        mgr.save(1, _state(1))
        mgr.mirror.wait()
        before = len(fault_proxy.log)
        assert mgr.restore("latest")["step"] == 1
        gets = [p for m, p, _, _ in fault_proxy.log[before:] if m == "GET" and "state.safetensors" in p]
        assert gets == []  # read from the local copy: no download
        data = local / "step_1" / "state.safetensors"
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
        caplog.clear()
        assert torch.equal(mgr.restore("latest")["model"]["w"], torch.full((64, 32), 1.0))
        assert "checksum mismatch" in caplog.text and "reading step 1 from" in caplog.text
        gets = [p for m, p, _, _ in fault_proxy.log[before:] if m == "GET" and "state.safetensors" in p]
        assert gets  # the remote copy was read


def test_remote_delete_waits_for_the_newer_upload(s3_bucket, s3_server, s3_options, tmp_path, fault_proxy):
    """keep_last=1: step 1 goes from the remote only once step 2 is there, though locally it is
    gone as soon as step 2 commits. The upload of step 2 is held back (slow answers) to show it."""
    local = tmp_path / "local"
    url = f"s3://{s3_bucket}/run"
    options = s3_server.storage_options(fault_proxy.endpoint)
    with CheckpointManager(url, storage_options=options, mirror=local, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        mgr.mirror.wait()
        assert _remote_steps(s3_server, s3_bucket) == [1]
        fault_proxy.inject("slow", count=1, method="PUT", path="step_2/manifest.json", delay=2.0)
        mgr.save(2, _state(2))
        assert _local_steps(local) == [2]  # retention removed the local step 1 at once
        seen = []
        while mgr.mirror.engine.pending():  # while the upload of step 2 runs, step 1 stays remote
            remote = _remote_steps(s3_server, s3_bucket)
            seen.append(remote)
            assert remote, "the store held no checkpoint while step 2 was uploading"
            threading.Event().wait(0.05)
        mgr.mirror.wait()
        assert [1] in seen  # step 2's upload was still running, and step 1 was still there
        assert _remote_steps(s3_server, s3_bucket) == [2]
    log = [(m, p) for m, p, _, _ in fault_proxy.log]
    put_2 = log.index(("PUT", f"/{s3_bucket}/run/step_2/manifest.json"))
    delete_1 = log.index(("DELETE", f"/{s3_bucket}/run/step_1/manifest.json"))
    assert put_2 < delete_1, log


def test_sigkill_between_local_commit_and_upload_then_the_next_manager_uploads(
    s3_bucket, s3_server, s3_options, tmp_path, fault_proxy
):
    """The child commits step 1 and 2 locally while every upload request is dropped by the proxy,
    reports them, and is killed: the remote has no committed step 2. A new manager on the same
    mirror uploads both before it saves anything."""
    local = tmp_path / "local"
    url = f"s3://{s3_bucket}/run"
    fault_proxy.inject("drop", count=10_000, path="/run/step_")  # no upload request reaches the store
    _commit_two_steps_locally_then_sigkill(fault_proxy, url, local)
    assert _remote_steps(s3_server, s3_bucket) == []
    assert _local_steps(local) == [1, 2]
    with CheckpointManager(url, storage_options=s3_options, mirror=local, keep_local=1) as mgr:
        assert mgr.steps() == [1, 2]
        mgr.mirror.wait()
        assert _remote_steps(s3_server, s3_bucket) == [1, 2]
        assert _local_steps(local) == [2]
        keys = _keys(s3_server, s3_bucket, "run/")
        assert {k.split("/")[1] for k in keys} == {".lock", "step_1", "step_2"}, keys  # no leftover of the kill
    with CheckpointManager(url, storage_options=s3_options, read_only=True) as reader:
        for step in (1, 2):
            assert reader.verify(step) == []
            assert reader.restore(step)["step"] == step


def test_templated_and_named_checkpoints_are_uploaded_again_after_a_sigkill(
    s3_bucket, s3_server, s3_options, tmp_path, fault_proxy, monkeypatch
):
    """Lightning's names through the mirror: the child commits ``epoch=0-step=1.ckpt``,
    ``epoch=0-step=2.ckpt`` and the named ``last.ckpt`` (saved at each step, replaced) locally while
    every upload is dropped, and is killed. The next manager uploads all three (``last.ckpt`` in its
    step-2 version), and a save after that replaces the store's ``last.ckpt`` with the new version."""
    local = tmp_path / "local"
    url = f"s3://{s3_bucket}/run"
    template = "epoch=0-step={step}{version}.ckpt"
    fault_proxy.inject("drop", count=10_000, path=".ckpt/")  # no upload of a checkpoint reaches the store
    _commit_two_steps_locally_then_sigkill(fault_proxy, url, local, "sync", "names")
    assert not [k for k in _keys(s3_server, s3_bucket, "run/") if k.endswith("/manifest.json")]
    names = {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"}
    assert names <= set(os.listdir(local))
    with CheckpointManager(url, storage_options=s3_options, mirror=local, name_template=template) as mgr:
        assert mgr.steps() == [1, 2]
        mgr.mirror.wait()
        assert mgr.mirror.pending_names() == []
        manifests = {k.split("/")[1] for k in _keys(s3_server, s3_bucket, "run/") if k.endswith("/manifest.json")}
        assert manifests == names
        mgr.save(3, _state(3))
        mgr.save(3, _state(3), name="last.ckpt")
        mgr.mirror.wait()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # a restore by URL reads the environment
    with CheckpointManager(url, storage_options=s3_options, read_only=True, name_template=template) as reader:
        assert reader.steps() == [1, 2, 3]
        assert reader.restore(f"{url}/last.ckpt")["step"] == 3  # the new version replaced the old one
        for step in (1, 2, 3):
            assert reader.verify(step) == [] and reader.restore(step)["step"] == step


def test_an_upload_that_fails_stays_local_and_is_retried(s3_bucket, s3_server, tmp_path, fault_proxy, caplog):
    local = tmp_path / "local"
    url = f"s3://{s3_bucket}/run"
    options = s3_server.storage_options(fault_proxy.endpoint)
    options["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"}}
    with CheckpointManager(url, storage_options=options, mirror=local) as mgr:
        fault_proxy.inject("500", count=20, method="PUT", path="step_1/manifest.json")
        mgr.save(1, _state(1))
        with pytest.raises(SaveError, match="step 1"):
            mgr.mirror.wait()
        assert "uploading step_1 (step 1)" in caplog.text and "stays committed in" in caplog.text
        assert _local_steps(local) == [1] and _remote_steps(s3_server, s3_bucket) == []
        fault_proxy.faults.clear()
        mgr.save(2, _state(2))  # the next upload job tries step 1 again
        mgr.mirror.wait()
        assert _remote_steps(s3_server, s3_bucket) == [1, 2]


def test_mirror_options_are_checked_at_construction(s3_bucket, s3_options, tmp_path):
    with pytest.raises(ConfigError) as info:
        CheckpointManager(tmp_path / "a", mirror=tmp_path / "b")
    assert info.value.option == "mirror"
    with pytest.raises(ConfigError) as info:
        CheckpointManager(f"s3://{s3_bucket}/run", storage_options=s3_options, mirror="s3://other/x")
    assert info.value.option == "mirror"
    with pytest.raises(ConfigError) as info:
        CheckpointManager(f"s3://{s3_bucket}/run", storage_options=s3_options, keep_local=2)
    assert info.value.option == "keep_local"
    with pytest.raises(ConfigError) as info:
        MirrorOptions(mirror=tmp_path, keep_local=0)
    assert info.value.option == "keep_local"
    same = CheckpointManager(
        f"s3://{s3_bucket}/run", storage_options=s3_options, mirror_options=MirrorOptions(tmp_path / "m", 2)
    )
    assert same.options.mirror.keep_local == 2
    same.close()
    # a local directory mirrors one remote only
    with pytest.raises(ConfigError, match="mirrors") as info:
        CheckpointManager(f"s3://{s3_bucket}/other", storage_options=s3_options, mirror=tmp_path / "m")
    marker = json.loads((tmp_path / "m" / ".mirror.json").read_text())
    assert marker["remote"] == f"s3://{s3_bucket}/run" and set(marker) == {"remote", "writer"}  # no credential


def test_no_credential_reaches_the_mirror_or_a_log_line(s3_bucket, s3_server, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    secret = "mirror-secret-4af1c0"
    options = {**s3_server.storage_options(), "key": "testing-key", "secret": secret}
    local = tmp_path / "local"
    caplog.set_level(logging.DEBUG, logger="ckpt_plugins")
    with CheckpointManager(f"s3://{s3_bucket}/run", storage_options=options, mirror=local) as mgr:
        mgr.save(1, _state(1))
    for path in local.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    client = s3_server.client()
    for key in _keys(s3_server, s3_bucket):
        assert secret.encode() not in client.get_object(Bucket=s3_bucket, Key=key)["Body"].read(), key
    assert secret not in caplog.text


def _spawn_two(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in two processes of one gloo group; fail with every rank's traceback."""
    import torch.multiprocessing as mp

    from ports import free_port

    errors = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank_entry, args=(fn, free_port(), errors, args), nprocs=2, join=True)
    if errors:
        pytest.fail("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(errors.items())))


def _rank_entry(rank, fn, port, errors, args):
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    except BaseException:
        errors[rank] = traceback.format_exc()
    finally:
        dist.destroy_process_group()


def _two_ranks_through_a_mirror(rank, url, options, local, other):
    import torch.distributed as dist

    with CheckpointManager(url, storage_options=options, mirror=local, keep_last=2, async_save=True) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step), rank_state={"rank": rank, "x": torch.full((8,), float(10 * rank + step))})
        mgr.wait()
        mgr.mirror.wait()
        assert mgr.steps() == [2, 3]
    dist.barrier()
    # another host's view: an empty local directory, everything read from the store
    with CheckpointManager(url, storage_options=options, mirror=other, read_only=True) as mgr:
        assert mgr.steps() == [2, 3]
        assert mgr.restore("latest")["step"] == 3
        mine = mgr.restore_rank_state("latest")
        assert mine["rank"] == rank and torch.equal(mine["x"], torch.full((8,), float(10 * rank + 3)))


def test_two_ranks_save_through_a_mirror_and_rank_0_uploads_the_manifest_last(
    s3_bucket, s3_server, tmp_path, fault_proxy
):
    """DDP x2 (gloo): both ranks commit into the one local directory, each rank's file reaches the
    store, and rank 0 puts each manifest after every file of its checkpoint; the store's copy
    restores on both ranks with their own rank state."""
    url = f"s3://{s3_bucket}/run"
    options = s3_server.storage_options(fault_proxy.endpoint)
    _spawn_two(_two_ranks_through_a_mirror, url, options, str(tmp_path / "local"), str(tmp_path / "other"))
    assert _remote_steps(s3_server, s3_bucket) == [2, 3]
    files = {k.split("/", 2)[2] for k in _keys(s3_server, s3_bucket, "run/step_3/")}
    assert files == {"manifest.json", "rank_0.safetensors", "rank_1.safetensors", "state.safetensors"}, files
    for step in (2, 3):  # (step 1 may have been removed by retention before its upload)
        puts = [p for m, p, _, _ in fault_proxy.log if m in ("PUT", "POST") and f"/run/step_{step}/" in p]
        assert puts and puts[-1].endswith(f"/run/step_{step}/manifest.json"), puts
        assert {p.rsplit("/", 1)[-1] for p in puts} >= {"rank_0.safetensors", "rank_1.safetensors"}, puts


def _blind_rank(rank, url, options, local, other):
    mgr = CheckpointManager(url, storage_options=options, mirror=local if rank == 0 else other)
    try:
        with pytest.raises(ConfigError, match=r"not the directory rank 0 writes for rank\(s\) \[1\]") as info:
            mgr.save(1, _state(1))
        assert info.value.option == "mirror"
    finally:
        mgr.close()


def test_a_rank_that_does_not_see_rank_0s_mirror_fails_every_rank_at_the_first_save(s3_bucket, s3_options, tmp_path):
    url = f"s3://{s3_bucket}/run"
    _spawn_two(_blind_rank, url, s3_options, str(tmp_path / "local"), str(tmp_path / "elsewhere"))
