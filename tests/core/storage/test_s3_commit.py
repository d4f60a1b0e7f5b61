"""The commit protocol on a store without rename (S3 through s3fs, against a real moto server).

Files go straight under the final prefix, the manifest last; a prefix without a manifest is never
listed and is cleaned by the next writer; delete removes the manifest first; overwrite writes a
new version beside the old one, so one of them is always committed; nothing is ever copied
inside the store.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import CorruptCheckpointError


def _state(step: int, n: int = 64) -> dict:
    return {"model": {"w": torch.full((n, 32), float(step))}, "step": step}


def _keys(server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _copies(proxy) -> list:
    return [entry for entry in proxy.log if any(k.lower() == "x-amz-copy-source" for k in entry[3])]


def test_save_and_restore_on_s3(s3_bucket, s3_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=s3_options, keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
        assert mgr.steps() == [2, 3]
        assert torch.equal(mgr.restore("latest")["model"]["w"], torch.full((64, 32), 3.0))
        assert mgr.verify(3) == []


def test_files_go_under_the_final_prefix_manifest_last_and_nothing_is_copied(
    s3_bucket, s3_server, fault_proxy, proxied_options
):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        writes = [path for method, path, _, _ in fault_proxy.log if method in ("PUT", "POST")]
        data = [i for i, p in enumerate(writes) if p.endswith("run/step_1/state.safetensors")]
        manifest = [i for i, p in enumerate(writes) if p.endswith("run/step_1/manifest.json")]
        assert data and manifest and max(data) < min(manifest), writes
        before = len(fault_proxy.log)
        mgr.save(2, _state(2))  # retention deletes step 1
    assert _copies(fault_proxy) == []
    deletes = [
        (method, path)
        for method, path, query, _ in fault_proxy.log[before:]
        if (method == "DELETE" and "/step_1/" in path) or (method == "POST" and "delete" in query)
    ]
    manifest_first = deletes.index(("DELETE", f"/{s3_bucket}/run/step_1/manifest.json"))
    assert ("POST", f"/{s3_bucket}") in deletes[manifest_first:], deletes  # the data after the manifest
    assert all(m == "DELETE" and not p.endswith(".safetensors") for m, p in deletes[:manifest_first]), deletes
    assert _keys(s3_server, s3_bucket, "run/step_1/") == []
    assert _keys(s3_server, s3_bucket, "run/step_2/") == ["run/step_2/manifest.json", "run/step_2/state.safetensors"]


def test_a_prefix_without_manifest_is_never_listed_and_the_next_writer_removes_it(
    s3_bucket, s3_server, s3_options, caplog
):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        mgr.save(1, _state(1))
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="run/step_7/state.safetensors", Body=b"half an upload")
    client.put_object(Bucket=s3_bucket, Key="run/named/.incomplete", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="run/named/extra.bin", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="run/notes/readme.txt", Body=b"not ours")
    with CheckpointManager(url, storage_options=s3_options, read_only=True) as reader:
        assert reader.steps() == [1]  # listed only with a manifest, even before any cleanup
    with (
        caplog.at_level(logging.INFO, logger="ckpt_plugins"),
        CheckpointManager(url, storage_options=s3_options) as mgr,
    ):
        assert mgr.steps() == [1]
    assert "leftover" in caplog.text
    assert _keys(s3_server, s3_bucket, "run/") == [
        "run/notes/readme.txt",
        "run/step_1/manifest.json",
        "run/step_1/state.safetensors",
    ]


def test_overwrite_keeps_the_old_checkpoint_until_the_new_manifest_replaces_it(
    s3_bucket, s3_server, fault_proxy, proxied_options
):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    # The manifest PUT of the overwrite fails: the old step 2 must still be there, intact.
    fault_proxy.inject("500", count=100, method="PUT", path="step_2/manifest.json")
    with CheckpointManager(url, storage_options=proxied_options, overwrite=True) as mgr:
        with pytest.raises(OSError, match=r"s3://.*step_2/manifest\.json.*failed after retries"):
            mgr.save(2, _state(20))
        assert mgr.steps() == [1, 2]
        assert torch.equal(mgr.restore(2)["model"]["w"], torch.full((64, 32), 2.0))
    fault_proxy.faults.clear()
    with CheckpointManager(url, storage_options=proxied_options, overwrite=True) as mgr:
        mgr.save(2, _state(20))
        assert torch.equal(mgr.restore(2)["model"]["w"], torch.full((64, 32), 20.0))
        assert mgr.verify(2) == []
    keys = _keys(s3_server, s3_bucket, "run/step_2/")
    assert len(keys) == 2 and keys[0] == "run/step_2/manifest.json" and keys[1].endswith("/state.safetensors"), keys
    assert keys[1].startswith("run/step_2/v")  # the new version; the old files are gone
    assert _copies(fault_proxy) == []


def test_a_crash_between_new_manifest_and_old_files_removal_is_cleaned(s3_bucket, s3_server, s3_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        mgr.save(3, _state(3))
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="run/step_3/v0123456789ab/state.safetensors", Body=b"an unfinished version")
    client.put_object(Bucket=s3_bucket, Key="run/step_3/.incomplete", Body=b"")
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        assert mgr.steps() == [3]
        assert torch.equal(mgr.restore(3)["model"]["w"], torch.full((64, 32), 3.0))
    assert _keys(s3_server, s3_bucket, "run/step_3/") == ["run/step_3/manifest.json", "run/step_3/state.safetensors"]


def test_damaged_object_fails_its_checksum_and_restore_falls_back(s3_bucket, s3_server, s3_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    client = s3_server.client()
    key = "run/step_2/state.safetensors"
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            mgr.restore(2)
        assert mgr.restore("latest")["step"] == 1  # the damaged newest is skipped, with a warning


def test_large_files_are_multipart_uploads_and_ranged_reads(s3_bucket, s3_server, fault_proxy, proxied_options):
    from ckpt_plugins.storage import object_store

    url = f"s3://{s3_bucket}/run"
    state = {"w": torch.randn(3 * object_store.PART_BYTES // 4 + 12345)}  # ~3 parts, several read ranges
    with CheckpointManager(url, storage_options=proxied_options) as mgr:
        mgr.save(1, state)
        assert torch.equal(mgr.restore(1)["w"], state["w"])
    uploads = [q for method, path, q, _ in fault_proxy.log if method == "PUT" and "partNumber=" in q]
    assert len(uploads) >= 3
    ranged = [
        h
        for method, path, _, h in fault_proxy.log
        if method == "GET" and "state.safetensors" in path and any(k.lower() == "range" for k in h)
    ]
    assert len(ranged) >= 3
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_parts_and_read_ranges_are_in_flight_together_and_nothing_is_copied_to_local_disk(
    s3_bucket, fault_proxy, proxied_options, tmp_path, monkeypatch
):
    """The first part upload and the first ranged GET are held back by the proxy: the other parts
    and ranges go out meanwhile (parallel transfers), and the upload is sent from the staged
    buffers: no temporary file appears."""
    import tempfile

    from ckpt_plugins.storage import object_store

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    state = {"w": torch.randn(3 * object_store.PART_BYTES // 4 + 12345)}  # 3 parts, several ranges
    fault_proxy.inject("slow", count=1, method="PUT", path="state.safetensors", delay=1.0)
    fault_proxy.inject("slow", count=1, method="GET", path="state.safetensors", delay=1.0)
    with CheckpointManager(f"s3://{s3_bucket}/run", storage_options=proxied_options) as mgr:
        mgr.save(1, state)
        assert torch.equal(mgr.restore(1)["w"], state["w"])
    assert fault_proxy.peak["part"] >= 2, fault_proxy.peak
    assert fault_proxy.peak["range"] >= 2, fault_proxy.peak
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("size", [1000, 12 << 20])  # one PUT; a multipart upload
def test_one_object_appears_whole_or_not_at_all(s3_bucket, s3_server, s3_options, monkeypatch, size):
    """What single-file checkpoints rely on where there is no rename: an object written with
    ``open_write`` is invisible until ``close`` completes it; a failure in between leaves the
    previous object (or none) and no unfinished upload."""
    from ckpt_plugins.storage import object_store, open_storage

    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    storage, root = open_storage(f"s3://{s3_bucket}/one", s3_options)
    path = storage.join(root, "last.ckpt")
    storage.put_bytes(path, b"old")
    data = bytes(range(256)) * (size // 256)
    with pytest.raises(RuntimeError, match="interrupted"), storage.open_write(path) as out:
        out.write(data)
        with storage.open_read(path) as f:
            assert f.read() == b"old"  # still the old object while the new one is being written
        raise RuntimeError("interrupted")
    with storage.open_read(path) as f:
        assert f.read() == b"old"
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    with storage.open_write(path) as out:
        out.write(data)
    with storage.open_read(path) as f:
        assert f.read() == data


def test_single_file_checkpoints_on_s3_are_one_atomic_object(s3_bucket, s3_server, s3_options):
    """The one-file format (Lightning's ``.ckpt`` paths) commits by rename locally; on S3 the
    object itself is the commit: no temporary object, no copy, and a failed write leaves the old one."""
    from ckpt_plugins.files.single_file import read_single_file, reserve, write_single_file
    from ckpt_plugins.files.tensor_file import write_tensor_file
    from ckpt_plugins.storage import open_storage
    from ckpt_plugins.tree.codec import flatten_state

    storage, root = open_storage(f"s3://{s3_bucket}/lit", s3_options)
    path = storage.join(root, "last.ckpt")

    def save(value: float, writer=None):
        flat = flatten_state({"w": torch.full((1000,), value), "epoch": int(value)})
        return write_single_file(storage, path, flat.tree, flat.tensors, {"step": int(value)}, write_tensors=writer)

    assert reserve(storage, storage.join(root, "new.ckpt")) and not reserve(storage, storage.join(root, "new.ckpt"))
    save(1.0)

    def failing(p, tensors, metadata):
        write_tensor_file(storage, p, tensors, metadata)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        save(2.0, failing)  # written, then failed before returning: the commit point is the upload's end
    save(3.0)
    state, info = read_single_file(storage, path)
    assert state["epoch"] == 3 and info["step"] == 3
    assert _keys(s3_server, s3_bucket, "lit/") == ["lit/last.ckpt", "lit/new.ckpt"]  # no temporary objects


def test_quarantine_moves_only_the_manifest_aside_and_cleanup_keeps_the_files(s3_bucket, s3_server, s3_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=s3_options) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        target = mgr.quarantine(2, "bad bytes")
        assert mgr.steps() == [1]
    assert "step_2/manifest.damaged-" in target
    with CheckpointManager(url, storage_options=s3_options) as mgr:  # start-up cleanup leaves it alone
        assert mgr.steps() == [1]
    keys = _keys(s3_server, s3_bucket, "run/step_2/")
    assert "run/step_2/state.safetensors" in keys and any("manifest.damaged-" in k for k in keys)


def test_storage_options_never_reach_a_checkpoint_or_a_log_line(s3_bucket, s3_server, caplog, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    secret = "sEcReT-do-not-leak-0123456789"
    options = {**s3_server.storage_options(), "key": "key-id-do-not-leak", "secret": secret}
    url = f"s3://{s3_bucket}/run"
    with caplog.at_level(logging.DEBUG, logger="ckpt_plugins"):
        with CheckpointManager(url, storage_options=options, keep_last=1) as mgr:
            mgr.save(1, _state(1))
            mgr.save(2, _state(2))
            mgr.restore("latest")
            assert secret not in repr(vars(mgr))
        with pytest.raises(OSError) as failed:  # an error names the object, never the options
            CheckpointManager(f"s3://no-such-bucket-{s3_bucket}/run", storage_options=options)
    assert "no-such-bucket" in str(failed.value) and secret not in str(failed.value)
    client = s3_server.client()
    for key in _keys(s3_server, s3_bucket):
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert secret.encode() not in body and b"do-not-leak" not in body, key
    assert "do-not-leak" not in caplog.text and secret not in caplog.text
