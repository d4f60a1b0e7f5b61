"""Faults between s3fs and the server (a loopback proxy): 500/503, dropped connections, slow and
truncated answers. Transient faults are retried; persistent ones fail with an error naming the
object; nothing incomplete is ever listed and nothing committed is lost."""

from __future__ import annotations

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.storage import object_store


def _state(step: int) -> dict:
    return {"w": torch.full((256, 256), float(step)), "step": step}


def _keys(server, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.mark.parametrize(
    ("kind", "method", "path"),
    [
        ("503", "PUT", "state.safetensors"),
        ("500", "PUT", "manifest.json"),
        ("drop", "PUT", "state.safetensors"),
        ("slow", None, None),
        ("503", "GET", "state.safetensors"),
        ("drop", "GET", "state.safetensors"),
        ("truncate", "GET", "state.safetensors"),
    ],
)
def test_transient_faults_are_retried(s3_bucket, fault_proxy, proxied_options, kind, method, path):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options) as mgr:
        fault_proxy.inject(kind, count=2, method=method, path=path, delay=0.3)
        mgr.save(1, _state(1))
        state = mgr.restore(1)
        assert torch.equal(state["w"], _state(1)["w"])
    assert fault_proxy.injected == 2


def test_faults_in_a_multipart_upload_are_retried(s3_bucket, fault_proxy, proxied_options, monkeypatch):
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    monkeypatch.setattr(object_store, "READ_CHUNK", 1 << 20)
    url = f"s3://{s3_bucket}/run"
    state = {"w": torch.randn(4 << 20)}  # 16 MiB: four parts
    with CheckpointManager(url, storage_options=proxied_options, async_save=True) as mgr:
        fault_proxy.inject("drop", count=1, method="PUT", path="state.safetensors")
        fault_proxy.inject("503", count=2, method="PUT", path="state.safetensors")
        fault_proxy.inject("truncate", count=2, method="GET", path="state.safetensors")
        mgr.save(1, state).wait()
        assert torch.equal(mgr.restore(1)["w"], state["w"])
    assert fault_proxy.injected == 5


def test_a_persistent_upload_failure_names_the_object_and_lists_nothing(
    s3_bucket, s3_server, fault_proxy, proxied_options
):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options) as mgr:
        mgr.save(1, _state(1))
        fault_proxy.inject("500", count=1000, method="PUT", path="step_2/state.safetensors")
        with pytest.raises(OSError, match=r"s3://.*/run/step_2/state\.safetensors: put_object failed after retries"):
            mgr.save(2, _state(2))
        assert mgr.steps() == [1]
    fault_proxy.faults.clear()
    assert not [k for k in _keys(s3_server, s3_bucket) if "step_2" in k]  # the failed save removed its files
    with CheckpointManager(url, storage_options=proxied_options) as mgr:
        assert mgr.steps() == [1]
        assert torch.equal(mgr.restore("latest")["w"], _state(1)["w"])


def test_an_async_save_failure_surfaces_on_its_handle(s3_bucket, fault_proxy, proxied_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options, async_save=True, on_error="warn") as mgr:
        fault_proxy.inject("500", count=1000, method="PUT", path="step_1/manifest.json")
        handle = mgr.save(1, _state(1))
        with pytest.raises(OSError, match=r"step_1/manifest\.json: put_object failed after retries"):
            handle.wait()
        fault_proxy.faults.clear()
        mgr.save(2, _state(2)).wait()
        assert mgr.steps() == [2]


def test_a_body_that_keeps_coming_back_truncated_is_a_clear_error(s3_bucket, fault_proxy, proxied_options):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=proxied_options) as mgr:
        mgr.save(1, _state(1))
        fault_proxy.inject("truncate", count=10_000, method="GET", path="state.safetensors")
        with pytest.raises(OSError, match=r"s3://.*/run/step_1/state\.safetensors: read of bytes 0-\d+ failed"):
            mgr.restore(1)
        fault_proxy.faults.clear()
        assert torch.equal(mgr.restore(1)["w"], _state(1)["w"])
