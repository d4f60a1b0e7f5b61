"""Checksums taken while staging (persist/hashed_copy): the same bytes as the file, verified on
restore, never trusted for a file they do not describe; the piecewise copy of every kind of
tensor; staging memory prepared ahead of the first save."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from ckpt_plugins import CheckpointManager, CorruptCheckpointError
from ckpt_plugins.files.extra_files import StagedFile, TensorFile
from ckpt_plugins.files.tensor_file import Prehashed, checksum_file, file_head, write_tensor_file
from ckpt_plugins.persist import hashed_copy
from ckpt_plugins.persist.save_job import file_heads
from ckpt_plugins.persist.stager import HostStager
from ckpt_plugins.storage import LocalStorage
from conftest import make_training_state, state_of


def odd_tensors() -> dict[str, torch.Tensor]:
    """Tensors a memmove cannot copy as they are, next to plain ones, in several dtypes."""
    torch.manual_seed(0)
    big = torch.randn(3 * hashed_copy.PIECE // 4 + 17)  # several pieces and a ragged end
    return {
        "big": big,
        "transposed": torch.randn(33, 7).t(),
        "conj": torch.randn(5, dtype=torch.complex64).conj(),
        "neg": torch.randn(6, dtype=torch.complex64).conj().imag,
        "bf16": torch.randn(11).to(torch.bfloat16),
        "flags": torch.rand(13) > 0.5,
        "ints": torch.arange(9, dtype=torch.int16),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "offset": big[5:1000],  # a view with a storage offset
    }


def test_the_checksum_taken_while_staging_is_the_files_checksum(tmp_path):
    tensors = {f"state/{k}": v for k, v in odd_tensors().items()}
    stager = HostStager(1)
    heads = file_heads(tensors, {})
    staged = stager.stage(0, tensors, heads)
    prehashed = staged.digests["state"]
    storage = LocalStorage()
    path = str(tmp_path / "state.safetensors")
    named = {k[6:]: v for k, v in staged.tensors.items()}
    record = write_tensor_file(storage, path, named, prehashed=prehashed)
    assert record == checksum_file(storage, path)
    assert prehashed.digest == record.xxh3_64
    for key, value in tensors.items():
        assert torch.equal(staged.tensors[key], value), key


def test_a_prehashed_digest_is_used_only_for_the_file_it_describes(tmp_path):
    """The writer trusts a digest that matches its header and memory (it does not hash again:
    a made-up digest comes back), and ignores one for another header or other memory."""
    tensors = {"state/a": torch.randn(1000), "state/b": torch.randn(20)}
    staged = HostStager(1).stage(0, tensors, file_heads(tensors, {}))
    real = staged.digests["state"]
    named = {k[6:]: v for k, v in staged.tensors.items()}
    storage = LocalStorage()
    path = str(tmp_path / "f.safetensors")
    made_up = Prehashed(real.head, real.address, real.nbytes, "0123456789abcdef")
    assert write_tensor_file(storage, path, named, prehashed=made_up).xxh3_64 == "0123456789abcdef"
    truth = checksum_file(storage, path).xxh3_64
    others = [
        Prehashed(file_head(named, {"format": "pt"}), real.address, real.nbytes, "0123456789abcdef"),
        Prehashed(real.head, real.address + 4, real.nbytes, "0123456789abcdef"),
        Prehashed(real.head, real.address, real.nbytes - 4, "0123456789abcdef"),
    ]
    for other in others:
        assert write_tensor_file(storage, path, named, prehashed=other).xxh3_64 == truth
    live = {"a": tensors["state/a"], "b": tensors["state/b"]}  # not the staged memory
    assert write_tensor_file(storage, path, live, prehashed=real).xxh3_64 == truth


@pytest.mark.parametrize("snapshot", ["safe", "overlap"])
def test_async_saves_hash_while_staging_and_restore_verifies(tmp_path, snapshot):
    model, opt, sched = make_training_state()
    state = {**state_of(model, opt, sched), "odd": odd_tensors()}
    extra = {"weights.safetensors": TensorFile(dict(model.state_dict()), metadata={"format": "pt"})}
    with CheckpointManager(tmp_path, async_save=True, snapshot=snapshot) as mgr:
        mgr.save(1, state, rank_state={"r": torch.arange(5.0)}, extra_files=extra).wait()
        assert mgr.verify(1) == []
        manifest = mgr.layout.read_manifest(mgr.path_for(1))
        for name in ("state.safetensors", "rank_0.safetensors", "weights.safetensors"):
            assert checksum_file(mgr.storage, f"{mgr.path_for(1)}/{name}") == manifest.files[name], name
        restored = mgr.restore(1)
    for key, value in state["odd"].items():
        assert torch.equal(restored["odd"][key], value), key
    for key, value in model.state_dict().items():
        assert torch.equal(restored["model"][key], value)


def test_a_damaged_file_is_still_caught_after_hashing_moved_to_staging(tmp_path):
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, {"w": torch.randn(10_000)}).wait()
        path = tmp_path / "step_1" / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.verify(1)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            mgr.restore(1)


def test_a_failing_copy_stops_the_hasher_and_fails_the_save(tmp_path):
    """A copy that raises fails the stage and leaves the copy threads ready for the next one."""
    tensors = {"state/a": torch.randn(4 * hashed_copy.PIECE // 4), "state/b": torch.randn(10)}
    stager = HostStager(1)
    stager.stage(0, tensors)
    pairs = [(stager.arena(0).views[k], v) for k, v in tensors.items()]
    pairs[1] = (pairs[1][0], torch.randn(11))  # cannot be copied into a view of 10 (nor memmoved)
    with pytest.raises(RuntimeError):
        hashed_copy.copy_and_hash(pairs, b"head", stager.arena(0).memory["state"])
    staged = stager.stage(0, tensors, {"state": b"head"})  # the copy threads are free for the next copy
    assert staged.digests["state"].digest
    assert torch.equal(staged.tensors["state/a"], tensors["state/a"])


def test_prepare_allocates_the_first_saves_staging_memory_in_the_background(tmp_path, caplog):
    model, opt, sched = make_training_state()
    state = state_of(model, opt, sched)
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        with caplog.at_level(logging.INFO, logger="ckpt_plugins.persist.stager"):
            assert mgr.prepare(state)
            mgr.wait()
            prepared = {k: v.data_ptr() for k, v in mgr._persister.stager.arena(0).views.items()}
            mgr.save(1, state).wait()
        allocations = [r for r in caplog.records if "allocated" in r.getMessage()]
        assert len(allocations) == 1  # by prepare(); the save reused it
        assert {k: v.data_ptr() for k, v in mgr._persister.stager.arena(0).views.items()} == prepared
        restored = mgr.restore(1)
    for key, value in model.state_dict().items():
        assert torch.equal(restored["model"][key], value)


def test_prepare_does_nothing_where_nothing_is_staged(tmp_path):
    with CheckpointManager(tmp_path / "sync") as mgr:
        assert not mgr.prepare({"w": torch.zeros(3)})
    with CheckpointManager(tmp_path / "empty", async_save=True) as mgr:
        assert not mgr.prepare({"step": 3})


def test_a_staged_torch_save_file_is_written_from_the_staging_memory_and_loads(tmp_path):
    """A StagedFile's writer gets read-only views of the staged block; written straight from there
    (StableWithin) or copied, the file is torch.save's bytes and its checksum is the manifest's."""
    torch.manual_seed(0)
    tree = {"state": {i: {"exp_avg": torch.randn(300_000), "step": torch.tensor(3.0)} for i in range(3)}}
    extra = {"optimizer.pt": StagedFile(tree, lambda f, value: torch.save(value, f))}
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, {"step": 1}, extra_files=extra).wait()
        path = f"{mgr.path_for(1)}/optimizer.pt"
        manifest = mgr.layout.read_manifest(mgr.path_for(1))
        assert checksum_file(mgr.storage, path) == manifest.files["optimizer.pt"]
    loaded = torch.load(path, weights_only=True)
    for i, entry in tree["state"].items():
        assert torch.equal(loaded["state"][i]["exp_avg"], entry["exp_avg"])
        assert torch.equal(loaded["state"][i]["step"], entry["step"])


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform (the writer is the plain file)")
def test_stable_within_hands_only_memory_inside_its_ranges_to_the_disk_as_is(tmp_path, monkeypatch):
    """Any buffer outside the ranges is copied at once (the caller may reuse it as soon as write()
    returns: changing it afterwards does not reach the file); the file holds both, in order. On a
    file system that refuses the flag (tmpfs) the same writer runs with plain writes."""
    monkeypatch.delenv("CKPT_PLUGINS_DIRECT_IO", raising=False)
    from ckpt_plugins.storage.direct_io import DIRECT_MIN, StableWithin, direct_writer

    inside = torch.zeros(DIRECT_MIN, dtype=torch.uint8)
    outside = torch.zeros(DIRECT_MIN, dtype=torch.uint8)
    ranges = [(inside.data_ptr(), inside.data_ptr() + inside.numel())]
    path = tmp_path / "f.bin"
    with open(path, "wb") as raw, direct_writer(raw) as direct:
        assert direct is not None, "a real file on a platform with O_DIRECT always gets the writer"
        out = StableWithin(direct, ranges)
        out.write(memoryview(outside.numpy()).toreadonly())
        out.write(memoryview(inside.numpy()).toreadonly())
        outside.fill_(1)  # copied already: not in the file
        direct.finish()
    data = path.read_bytes()
    assert data == bytes(2 * DIRECT_MIN)
