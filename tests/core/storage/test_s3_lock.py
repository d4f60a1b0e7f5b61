"""The object-store lock: a conditional create (If-None-Match: *), a heartbeat, stale takeover."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import LockedError
from ckpt_plugins.layout import lock as lock_module
from ckpt_plugins.storage import open_storage


def _lock_doc(server, bucket: str) -> dict:
    return json.loads(server.client().get_object(Bucket=bucket, Key="run/.lock")["Body"].read())


def _put_lock(server, bucket: str, **holder) -> None:
    server.client().put_object(Bucket=bucket, Key="run/.lock", Body=json.dumps(holder).encode())


def test_a_second_writer_is_refused_and_release_removes_the_lock(s3_bucket, s3_server, s3_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        doc = _lock_doc(s3_server, s3_bucket)
        assert doc["pid"] > 0 and doc["heartbeat"] > 0
        with pytest.raises(LockedError, match=r"run/\.lock is held by process"):
            CheckpointManager(url, storage_options=s3_options)
        mgr.save(1, {"w": torch.ones(2)})
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="run/.lock").get("KeyCount") == 0
    with CheckpointManager(url, storage_options=s3_options, read_only=True) as reader:
        assert reader.steps() == [1]


def test_conditional_create_lets_exactly_one_of_many_racers_win(s3_bucket, s3_options):
    storage, root = open_storage(f"s3://{s3_bucket}/race", s3_options)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        results.append(storage.create_exclusive(storage.join(root, "x"), str(i).encode()))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_with_a_warning(
    s3_bucket, s3_server, s3_options, caplog
):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _put_lock(
        s3_server, s3_bucket, host=socket.gethostname(), pid=int(dead.stdout), start_time="1", heartbeat=time.time()
    )
    with (
        caplog.at_level(logging.WARNING, logger="ckpt_plugins"),
        CheckpointManager(f"s3://{s3_bucket}/run", storage_options=s3_options) as mgr,
    ):
        mgr.save(1, {"w": torch.ones(2)})
    assert "taking over the lock" in caplog.text and "no longer running" in caplog.text


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_stops(s3_bucket, s3_server, s3_options, caplog):
    url = f"s3://{s3_bucket}/run"
    _put_lock(s3_server, s3_bucket, host="elsewhere", pid=123, heartbeat=time.time())
    with pytest.raises(LockedError, match="held by process 123 on host elsewhere"):
        CheckpointManager(url, storage_options=s3_options)
    _put_lock(s3_server, s3_bucket, host="elsewhere", pid=123, heartbeat=time.time() - 2 * lock_module.STALE_AFTER_S)
    with caplog.at_level(logging.WARNING, logger="ckpt_plugins"), CheckpointManager(url, storage_options=s3_options):
        assert _lock_doc(s3_server, s3_bucket)["host"] != "elsewhere"
    assert "last heartbeat" in caplog.text


def test_the_holder_refreshes_its_heartbeat(s3_bucket, s3_server, s3_options, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.2)
    with CheckpointManager(f"s3://{s3_bucket}/run", storage_options=s3_options):
        first = _lock_doc(s3_server, s3_bucket)["heartbeat"]
        deadline = time.monotonic() + 30
        while _lock_doc(s3_server, s3_bucket)["heartbeat"] == first:
            assert time.monotonic() < deadline, "the heartbeat was never refreshed"
            time.sleep(0.1)
