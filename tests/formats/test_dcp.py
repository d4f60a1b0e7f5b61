"""DCP folders read without running pickle code.

Folders are written by the real ``torch.distributed.checkpoint.save`` (one process, no process
group) and read back bit-exact, against the original tensors and against DCP's own reader.
Hostile ``.metadata`` pickles (an ``os.system`` REDUCE, a global outside the allow-list, one
nested deep inside real metadata, a dotted name under an allowed module) are refused naming the
file, and the marker file each payload would create is never there; each payload is shown to be
live by unpickling it with plain pickle afterwards.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from ckpt_plugins.formats import read_foreign
from ckpt_plugins.formats.dcp import iter_dcp, read_dcp
from ckpt_plugins.formats.dcp_metadata import ALLOWED_GLOBALS, read_dcp_metadata
from conftest import TinyNet, make_training_state
from dcp_states import assert_same, dcp_save


def dcp_own_read(path: Path, tmp_path: Path):
    """DCP's own reader (full pickle; our own trusted folder) as the reference."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(path, tmp_path / "ref.pt")
    return torch.load(tmp_path / "ref.pt", weights_only=True)


@pytest.fixture()
def training(tmp_path):
    model, opt, sched = make_training_state()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 7,
        "name": "run-1",
        "extra": {
            "bf16": torch.randn(3, 5).to(torch.bfloat16),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "empty": torch.zeros(0, 4),
            "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "flags": torch.tensor([True, False]),
            "list": [torch.ones(2), torch.full((3,), 2.0)],
            "nan": torch.tensor([float("nan"), -0.0]),
        },
    }
    return dcp_save(state, tmp_path / "dcp"), state


def test_a_training_state_reads_bit_exact_and_as_dcp_reads_it(training, tmp_path):
    path, state = training
    got = read_dcp(path)
    assert_same(got, dcp_own_read(path, tmp_path))
    assert_same(got["model"], state["model"])
    assert_same(got["extra"], state["extra"])
    assert got["step"] == 7 and got["name"] == "run-1"
    # DCP stringifies dict keys: the optimizer's parameter ids come back as "0", "1", ...
    assert sorted(got["optimizer"]["state"]) == sorted(str(k) for k in state["optimizer"]["state"])
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert_same(got["optimizer"]["state"]["0"], state["optimizer"]["state"][0])


def test_iter_yields_one_item_at_a_time_and_include_reads_only_selected(training):
    path, state = training
    keys = [k for k, _ in iter_dcp(path)]
    assert "model.fc1.weight" in keys and "step" in keys and "extra.list.1" in keys
    got = read_foreign(path, include=lambda k: k.startswith("model."))
    assert list(got) == ["model"]
    assert_same(got["model"], state["model"])


def test_restore_by_path_loads_a_module_and_meta_reads_no_tensor_data(training, tmp_path):
    path, state = training
    fresh = TinyNet()
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(os.fspath(path), target={"model": fresh}, include="model.*")
        assert mgr.last_restore_report.format == "dcp"
    assert_same(fresh.state_dict(), state["model"])
    meta = read_dcp(path, meta=True, include=lambda k: k.startswith("extra."))
    assert meta["extra"]["bf16"].device.type == "meta" and meta["extra"]["bf16"].dtype == torch.bfloat16
    assert meta["extra"]["ints"].shape == (2, 3)


# ----------------------------------------------------------------------------- hostile metadata


class _System:
    """Pickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle of ``module.name(arg)`` by STACK_GLOBAL (dotted names allowed)."""

    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + struct.pack("<B", len(b)) + b

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


def _payloads(real_metadata: bytes, marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    nested = pickle.loads(real_metadata)  # our own folder: trusted
    nested.planner_data["model.fc1.weight"] = ("model", [{"deep": _System(touch)}])
    return {
        "os.system REDUCE": pickle.dumps(_System(touch)),
        "global outside the list": pickle.dumps(_Eval(f"open({str(marker)!r}, 'w')")),
        "nested in real metadata": pickle.dumps(nested),
        "dotted name under an allowed module": _global_call(
            "torch.distributed.checkpoint.metadata", "os.system", touch
        ),
        "dotted name under torch.serialization": _global_call("torch.serialization", "os.system", touch),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "os.system REDUCE",
        "global outside the list",
        "nested in real metadata",
        "dotted name under an allowed module",
        "dotted name under torch.serialization",
    ],
)
def test_hostile_metadata_is_refused_without_running(training, tmp_path, kind):
    path, _ = training
    marker = tmp_path / "pwned"
    payload = _payloads((path / ".metadata").read_bytes(), marker)[kind]
    (path / ".metadata").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_foreign(path)
    assert str(path / ".metadata") in str(info.value) and "not one of DCP's metadata classes" in str(info.value)
    with pytest.raises(UnsafeCheckpointError), CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(os.fspath(path))
    assert not marker.exists()
    with warnings.catch_warnings():  # the payload is live: plain pickle runs it
        warnings.simplefilter("ignore")
        try:
            pickle.loads(payload)
        except Exception:
            pass
    assert marker.exists()


def test_the_allow_list_names_only_dcp_metadata_torch_values_and_paths():
    modules = {module for module, _ in ALLOWED_GLOBALS}
    assert modules == {
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed._shard.sharded_tensor.metadata",
        "torch",
        "torch.serialization",
        "pathlib",
        "pathlib._local",
    }
    torch_names = {name for module, name in ALLOWED_GLOBALS if module == "torch"}
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in torch_names - {"Size"})
    # nothing resolves to a DCP class or a torch function: only stand-ins and values
    stand_ins = [v for v in ALLOWED_GLOBALS.values() if not isinstance(v, torch.dtype)]
    assert {v.__module__ for v in stand_ins} == {"ckpt_plugins.formats.dcp_metadata"}


def test_a_byte_item_that_needs_full_pickle_is_refused_naming_its_key(tmp_path):
    marker = tmp_path / "pwned"
    path = dcp_save(
        {"w": torch.arange(4.0), "evil": _System(f"touch {marker}"), "day": datetime.date(2024, 1, 2)}, tmp_path / "d"
    )
    with pytest.raises(UnsafeCheckpointError, match="'evil'") as info:
        read_foreign(path)
    assert info.value.key_path == "evil" and "__0_0.distcp" in str(info.value)
    assert not marker.exists()
    safe = read_foreign(path, include=lambda k: k == "w")  # the rest reads
    assert torch.equal(safe["w"], torch.arange(4.0))
    with pytest.raises(UnsafeCheckpointError, match="'day'"):
        read_foreign(path, include=lambda k: k != "evil")
    trusted = read_foreign(path, include=lambda k: k == "day", allow_unsafe_pickle=True)
    assert trusted == {"day": datetime.date(2024, 1, 2)} and not marker.exists()


# ----------------------------------------------------------------------------- damaged folders


def test_damaged_folders_are_named(training, tmp_path):
    path, _ = training
    data = path / "__0_0.distcp"
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    with open(broken / "__0_0.distcp", "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_foreign(broken)
    os.remove(broken / "__0_0.distcp")
    with pytest.raises(CorruptCheckpointError, match="cannot be opened"):
        read_foreign(broken)
    (broken / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        read_foreign(broken)


def test_a_data_file_outside_the_folder_is_refused(training, tmp_path):
    path, _ = training
    meta = pickle.loads((path / ".metadata").read_bytes())  # our own folder: trusted
    (tmp_path / "outside.distcp").write_bytes((path / "__0_0.distcp").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../outside.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint folder"):
        read_dcp_metadata(path)


def test_storage_extensions_are_refused_naming_the_item(training):
    path, _ = training
    meta = pickle.loads((path / ".metadata").read_bytes())  # our own folder: trusted
    for index, info in meta.storage_data.items():
        if index.fqn == "model.fc1.weight":
            info.transform_descriptors = ["stream.zstd"]  # what DCP's ZStandard extension records
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(
        ConfigError, match=r"'model.fc1.weight' is stored through DCP storage extensions \['stream.zstd'\]"
    ):
        read_foreign(path)
    assert read_foreign(path, include=lambda k: k == "step") == {"step": 7}
