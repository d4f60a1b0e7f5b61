"""Restore from local disk maps the tensor file (issue #18): what that promises, on real files.

* the tensors are bit-for-bit what was saved, backed by a private mapping of the file (no copy);
* with checksums verified (the default) a damaged byte fails the restore and names the file;
* ``verify=False`` reads only what it returns: damage in tensors that were not asked for is not
  reported (and is not read);
* returned tensors stay valid after retention deletes their checkpoint and after a newer save
  overwrites the same step; writing into one changes neither the file nor a later restore;
* into ``target=`` modules and optimizers the copy into the target's own memory is the only copy,
  and nothing the target keeps is backed by the file;
* a tensor at an offset its dtype cannot be read from directly is copied; files that are not on
  local disk (fsspec) are read as before.
"""

from __future__ import annotations

import gc
import json
import os
import struct

import pytest
import torch

from ckpt_plugins import CheckpointManager, CorruptCheckpointError
from ckpt_plugins.files.tensor_file import checksum_file, is_mapped, read_header, read_tensor_file, write_tensor_file
from ckpt_plugins.storage import LocalStorage, open_storage

TENSOR_FILE = "state.safetensors"


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w32": torch.randn(64, 33, generator=gen),
        "w64": torch.randn(17, generator=gen, dtype=torch.float64),
        "bf16": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "i8": torch.randint(-128, 127, (13,), generator=gen, dtype=torch.int8),
        "flags": torch.rand(9, generator=gen) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert _bits(got[key]) == _bits(value), key


def _damage(path: os.PathLike[str] | str, key: str) -> None:
    """Flip one byte in the middle of tensor ``key``'s bytes, in place."""
    with open(path, "r+b") as f:
        entries, data_start = read_header(f, str(path), os.path.getsize(path))
        _dtype, _shape, begin, end = entries[key]
        where = data_start + (begin + end) // 2
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x5A]))


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "verify_off"])
def test_restored_tensors_are_bitwise_equal_and_backed_by_the_mapping(tmp_path, verify):
    state = _state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
    with CheckpointManager(tmp_path, read_only=True, verify=verify) as mgr:
        got = mgr.restore(1)
    _assert_bitwise(got, state)
    assert all(is_mapped(got[k]) for k in state if state[k].numel()), "non-empty tensors are not copies"
    # our files pad the header to a page (direct I/O): the padded header parses, data is aligned
    with open(tmp_path / "step_1" / TENSOR_FILE, "rb") as f:
        _, data_start = read_header(f, TENSOR_FILE, os.path.getsize(tmp_path / "step_1" / TENSOR_FILE))
    assert data_start % 4096 == 0


def test_a_damaged_byte_fails_the_verified_restore_and_names_the_file(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state())
    path = tmp_path / "step_1" / TENSOR_FILE
    _damage(path, "w32")
    with CheckpointManager(tmp_path, read_only=True) as mgr, pytest.raises(CorruptCheckpointError) as info:
        mgr.restore(1)
    assert str(path) in str(info.value) and "checksum mismatch" in str(info.value)


def test_verify_off_reads_only_the_keys_asked_for(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
    path = tmp_path / "step_1" / TENSOR_FILE
    for key in ("w32", "bf16", "i8"):  # every tensor but the two restored
        _damage(path, key)
    with CheckpointManager(tmp_path, read_only=True, verify=False) as mgr:
        got = mgr.restore(1, include=["w64", "scalar"])
        assert mgr.last_restore_report.ok
    _assert_bitwise(got, {k: state[k] for k in ("w64", "scalar")})
    with CheckpointManager(tmp_path, read_only=True) as mgr, pytest.raises(CorruptCheckpointError):
        mgr.restore(1)  # the damage is real: a verified full restore finds it


def test_tensors_stay_valid_after_retention_deletes_their_checkpoint(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, state)
        got = mgr.restore(1)
        mgr.save(2, _state(seed=1))
        mgr.wait()
        assert not (tmp_path / "step_1").exists(), "retention removed step 1"
        gc.collect()
        _assert_bitwise(got, state)


def test_tensors_stay_valid_after_a_newer_save_overwrites_the_same_step(tmp_path):
    state, newer = _state(), _state(seed=1)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        got = mgr.restore(1)
    with CheckpointManager(tmp_path, overwrite=True) as mgr:
        mgr.save(1, newer)
        mgr.wait()
        _assert_bitwise(mgr.restore(1), newer)
    _assert_bitwise(got, state)


def test_writing_into_a_returned_tensor_changes_neither_the_file_nor_a_later_restore(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        record = checksum_file(LocalStorage(), str(tmp_path / "step_1" / TENSOR_FILE))
        got = mgr.restore(1)
        got["w32"].fill_(7.0)
        got["i8"].zero_()
        assert bool((got["w32"] == 7.0).all())
        assert checksum_file(LocalStorage(), str(tmp_path / "step_1" / TENSOR_FILE)) == record
        assert mgr.verify(1) == []
        _assert_bitwise(mgr.restore(1), state)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _trained(seed: int) -> tuple[_Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _opt_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("fresh_optimizer", [True, False], ids=["fresh_optimizer", "optimizer_with_state"])
def test_restore_into_targets_is_the_same_and_copies_into_their_own_memory(tmp_path, fresh_optimizer):
    model, opt = _trained(seed=0)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    plain = CheckpointManager(tmp_path, read_only=True).restore(1)

    if fresh_optimizer:
        torch.manual_seed(1)
        into = _Net()
        into_opt = torch.optim.Adam(into.parameters(), lr=1e-2)
    else:
        into, into_opt = _trained(seed=1)  # trained elsewhere: its optimizer has state tensors
    params_before = [p.data_ptr() for p in into.parameters()]
    state_before = {t.data_ptr() for t in _opt_tensors(into_opt)}
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        mgr.restore(1, target={"model": into, "optimizer": into_opt})

    _assert_bitwise(into.state_dict(), plain["model"])
    assert [p.data_ptr() for p in into.parameters()] == params_before, "copied into the parameters"
    reference = torch.optim.Adam(model.parameters(), lr=1e-2)
    reference.load_state_dict(plain["optimizer"])
    for own, ref in zip(_opt_tensors(into_opt), _opt_tensors(reference), strict=True):
        assert _bits(own) == _bits(ref)
    assert not any(is_mapped(t) for t in _opt_tensors(into_opt)), "the optimizer owns its state"
    if not fresh_optimizer:
        assert {t.data_ptr() for t in _opt_tensors(into_opt)} == state_before, "copied into its own state"
    x = torch.randn(4, 8)
    assert torch.equal(into(x), model(x))


def test_a_tensor_at_an_offset_its_dtype_cannot_map_is_copied(tmp_path):
    """A foreign safetensors file may put a float32 at an odd offset: read correctly, by a copy."""
    odd = torch.tensor([1.5, -2.0, 3.0])
    byte = torch.tensor([9], dtype=torch.uint8)
    header = {
        "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + _bits(byte) + _bits(odd))
    got = read_tensor_file(LocalStorage(), str(path), expected=checksum_file(LocalStorage(), str(path)))
    _assert_bitwise(got, {"b": byte, "f": odd})
    assert is_mapped(got["b"]) and not is_mapped(got["f"])


def test_files_not_on_local_disk_are_read_into_memory(tmp_path):
    storage, root = open_storage("memory://h18r-mapped")
    tensors = _state()
    path = storage.join(root, TENSOR_FILE)
    storage.makedirs(root)
    record = write_tensor_file(storage, path, tensors, direct_io=False)
    try:
        got = read_tensor_file(storage, path, expected=record)
        _assert_bitwise(got, tensors)
        assert not any(is_mapped(t) for t in got.values())
    finally:
        storage.remove_tree(root)
