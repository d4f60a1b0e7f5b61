"""Staging memory whose storage is exactly the block, and ``save(wait=True)`` (issue #18).

* a staging block's storage starts where the block does, on a page, and ends where it ends:
  ``torch.save`` of staged tensors (the HF Trainer's ``optimizer.pt``) writes whole storages, so
  a storage larger than the block used to put uninitialised bytes in the file and kept the data
  from going to disk without one more copy;
* ``save(wait=True)`` under ``async_save`` returns committed, writes from the live tensors (no
  staging memory is ever allocated), restores bit for bit, and raises a failure at once.
"""

from __future__ import annotations

import zipfile

import pytest
import torch

from ckpt_plugins import CheckpointManager, ConfigError, SaveError
from ckpt_plugins.files.extra_files import StagedFile
from ckpt_plugins.hf.native import _torch_save
from ckpt_plugins.persist import stager as stager_module
from ckpt_plugins.persist.stager import ALIGN

SIZES = [1, ALIGN - 1, ALIGN, 3 * ALIGN + 5, 8 << 20]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("nbytes", SIZES)
def test_a_staging_block_is_its_whole_storage_and_starts_on_a_page(nbytes: int, shared: bool) -> None:
    block = stager_module._aligned_bytes(nbytes, False, shared)
    storage = block.untyped_storage()
    assert block.numel() == nbytes and block.data_ptr() % ALIGN == 0
    assert storage.data_ptr() == block.data_ptr() and storage.nbytes() == nbytes
    block.fill_(7)  # writable to the end
    assert int(block[-1]) == 7


def _optimizer() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return opt


def _state_bytes(state_dict: dict) -> int:
    return sum(t.numel() * t.element_size() for s in state_dict["state"].values() for t in s.values())


def test_a_staged_optimizer_file_holds_exactly_the_staged_bytes(tmp_path) -> None:
    opt = _optimizer()
    with CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, {"x": torch.zeros(3)}, extra_files={"optimizer.pt": StagedFile(opt.state_dict(), _torch_save)})
        mgr.wait()
    path = tmp_path / "run" / "step_1" / "optimizer.pt"
    with zipfile.ZipFile(path) as archive:
        data = [i for i in archive.infolist() if "/data/" in i.filename]
    assert len(data) == 1  # one staging block: one storage record
    assert data[0].file_size == _state_bytes(opt.state_dict())  # no slack from the allocation
    loaded = torch.load(path, weights_only=True)
    for index, tensors in opt.state_dict()["state"].items():
        for name, tensor in tensors.items():
            assert torch.equal(loaded["state"][index][name], tensor)


def test_save_wait_commits_before_returning_without_a_staging_copy(tmp_path) -> None:
    torch.manual_seed(1)
    state = {"w": torch.randn(256, 256), "b": torch.randn(256), "step": 3}
    with CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, state, wait=True)
        assert (tmp_path / "run" / "step_1" / "manifest.json").exists()  # committed on return
        stager = mgr._persister.stager
        assert all(stager.arena(slot) is None for slot in range(stager.slots))  # nothing was staged
        got = mgr.restore(1)
        assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"]) and got["step"] == 3
        mgr.save(2, state)  # an ordinary async save still stages
        mgr.wait()
        assert any(stager.arena(slot) is not None for slot in range(stager.slots))


def test_save_wait_raises_its_failure_at_once(tmp_path) -> None:
    def broken(_file) -> None:
        raise OSError("disk full (simulated by the file's writer)")

    with CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        with pytest.raises((SaveError, OSError), match="disk full"):
            mgr.save(1, {"w": torch.ones(4)}, extra_files={"extra.bin": broken}, wait=True)
        assert not (tmp_path / "run" / "step_1").exists()
        mgr.save(2, {"w": torch.ones(4)}, wait=True)  # the error was reported once, not again
    assert (tmp_path / "run" / "step_2" / "manifest.json").exists()


def test_a_save_the_caller_waits_for_reports_the_whole_wait_as_its_stall(tmp_path) -> None:
    # stats["stall_s"] is the part of save() that blocks training: for a synchronous save, or
    # save(wait=True), that is the whole save, not only the copy before the write.
    state = {"w": torch.randn(512, 512)}
    with CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        waited = mgr.save(1, state, wait=True)
        assert waited is not None
        assert waited.stats["stall_s"] >= waited.stats["persist_s"] > 0
    with CheckpointManager(tmp_path / "sync", async_save=False) as mgr:
        sync = mgr.save(1, state)
        assert sync is not None and sync.stats["stall_s"] >= sync.stats["persist_s"] > 0


@pytest.mark.parametrize("wait", ["yes", 1, None])
def test_save_wait_must_be_a_bool(tmp_path, wait) -> None:
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ConfigError, match="wait must be True or False"):
            mgr.save(1, {"w": torch.ones(2)}, wait=wait)
        assert mgr.steps() == []


def test_the_caller_stream_mark_is_none_without_cuda_tensors():
    """Overlap mode records the caller's stream position only for CUDA tensors; CPU states
    take nothing from CUDA (and need no CUDA build)."""
    assert stager_module.caller_stream_mark({"w": torch.zeros(3), "b": torch.ones(2)}) is None
