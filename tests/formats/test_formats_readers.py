"""Reader details the command line relies on: the Trainer's files inside our checkpoints, header-only
safetensors reads, and the name of a refused pickle global."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save, save_file

from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckpt_plugins.formats._pickle import load_pickle
from ckpt_plugins.formats.safetensors_file import read_safetensors


def _hf_like_run(directory):
    """A checkpoint-N folder the way ckpt_plugins.hf commits one: our state beside Trainer files."""
    weights = {"wte.weight": torch.randn(8, 4), "ln.bias": torch.zeros(4)}
    with CheckpointManager(directory, dir_prefix="checkpoint-") as mgr:
        mgr.save(
            3,
            {"data_position": {"global_step": 3}},
            extra_files={
                "model.safetensors": save(weights),
                "trainer_state.json": b'{"global_step": 3, "log_history": []}',
            },
            user_metadata={"written_by": "ckpt_plugins.hf"},
        )
    return weights


def test_restore_returns_the_trainer_files_and_honours_include(tmp_path):
    weights = _hf_like_run(tmp_path)
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        state = mgr.restore(str(tmp_path / "checkpoint-3"))
        only = mgr.restore(3, include="model.wte.*")
        renamed = mgr.restore(3, include="model.*", rename={"model.": "net."})
    assert state["data_position"] == {"global_step": 3} and state["trainer_state"]["global_step"] == 3
    assert all(torch.equal(state["model"][k], v) for k, v in weights.items())
    assert list(only) == ["model"] and list(only["model"]) == ["wte.weight"]
    assert set(renamed) == {"net"} and torch.equal(renamed["net"]["ln.bias"], weights["ln.bias"])


def test_a_damaged_trainer_file_fails_restore_naming_it(tmp_path):
    _hf_like_run(tmp_path)
    path = tmp_path / "checkpoint-3" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        with pytest.raises(CorruptCheckpointError, match="model.safetensors: size .* do not match the manifest"):
            mgr.restore(str(tmp_path / "checkpoint-3"))


def test_read_safetensors_meta_gives_shapes_and_dtypes_without_data(tmp_path):
    save_file({"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.arange(5)}, tmp_path / "w.safetensors")
    got = read_safetensors(tmp_path / "w.safetensors", meta=True)
    assert {k: (v.device.type, tuple(v.shape), v.dtype) for k, v in got.items()} == {
        "a": ("meta", (2, 3), torch.bfloat16),
        "b": ("meta", (5,), torch.int64),
    }


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this-should-never-run",))


def test_a_refused_global_is_named(tmp_path):
    torch.save({"x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"needs the global 'posix.system'") as info:
        load_pickle(tmp_path / "evil.pt")
    assert "allow-list'" not in str(info.value)


def test_only_checkpoints_the_hf_callback_wrote_get_the_trainer_files(tmp_path):
    weights = {"w": torch.ones(2)}
    with CheckpointManager(tmp_path) as mgr:  # a plain run that happens to keep a model.safetensors beside
        mgr.save(1, {"step": 1}, extra_files={"model.safetensors": save(weights)})
        assert mgr.restore(1) == {"step": 1}


def test_a_single_file_ckpt_restores_by_path_verified_and_without_pickle(tmp_path):
    """The Lightning plugin's one-file .ckpt is ours: restore("x.ckpt") and read_foreign read it
    (no torch.load), checking its data checksum; a flipped byte is a CorruptCheckpointError."""
    from ckpt_plugins.files.single_file import write_single_file
    from ckpt_plugins.formats import read_foreign
    from ckpt_plugins.storage import LocalStorage
    from ckpt_plugins.tree.codec import flatten_state

    state = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 7, "epoch": 0}
    flat = flatten_state(state)
    path = tmp_path / "epoch=0-step=7.ckpt"
    write_single_file(LocalStorage(), str(path), flat.tree, flat.tensors, {"step": 7})
    with CheckpointManager(tmp_path / "other", read_only=True) as mgr:
        restored = mgr.restore(str(path))
    assert restored["global_step"] == 7 and torch.equal(restored["state_dict"]["w"], torch.arange(6.0))
    only = read_foreign(path, include=lambda key: key.startswith("state_dict."))
    assert set(only) == {"state_dict"}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        read_foreign(path)
