"""Sharded state (DTensor) saved by every rank and restored into other layouts and world sizes.

Real FSDP2 (``fully_shard``) and tensor parallel (``parallelize_module``) on CPU processes over
gloo; every restore is compared bit for bit with the full state torch gathers
(``get_model_state_dict(..., full_state_dict=True)``) in the saving run. The multi-process cases
run in three launches (2, 3 and 4 ranks, tests/helpers/sharded_cases.py) shared by the package
(the ``root`` fixture, tests/sharded/conftest.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sharded_cases as cases
from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import CorruptCheckpointError


def _manifest(folder: Path) -> dict:
    (step,) = [p for p in folder.iterdir() if p.name.startswith("step_")]
    return json.loads((step / "manifest.json").read_text())


@pytest.mark.parametrize("saved", ["fsdp", "tp", "twod"])
def test_sharded_checkpoint_restores_into_a_plain_module_in_one_process(root, saved):
    """2 -> 1 (and 4 -> 1 from a 2-D mesh with strided shards): plain module and optimizer."""
    model = cases.build("plain")
    opt = cases.optimizer(model)
    with CheckpointManager(root / saved, read_only=True) as mgr:
        mgr.restore("latest", target={"model": model, "optimizer": opt})
    cases.assert_same(cases.plain_full_state(model, opt), load_file(root / f"expected_{saved}.safetensors"), saved)


def test_without_a_target_restore_returns_full_plain_tensors(root):
    expected = load_file(root / "expected_fsdp.safetensors")
    with CheckpointManager(root / "fsdp", read_only=True) as mgr:
        state = mgr.restore("latest")
    assert state["step"] == 1
    for key, value in state["model"].items():
        assert type(value) is torch.Tensor and torch.equal(value, expected[f"model/{key}"])
    names = list(state["model"])
    assert list(state["optimizer"]["state"]) == [0, 1, 2, 3]  # integer ids survive
    for pid, entry in state["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, expected[f"optim/{names[pid]}/{name}"])
    assert state["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_manifest_entries_tile_each_tensor_and_replicated_shards_are_written_once(root):
    sharded = _manifest(root / "tp")["sharded"]["tensors"]
    # rowwise TP: the second layer's bias is replicated on both ranks -> one chunk, from rank 0
    bias = sharded["model.2.bias"]["chunks"]
    assert [(c["offsets"], c["file"]) for c in bias] == [([0], "shard_0.safetensors")]
    # colwise TP: 8 rows over 2 ranks, one chunk each
    weight = sharded["model.0.weight"]
    assert weight["shape"] == [8, 5] and weight["dtype"] == "F32"
    assert [(c["offsets"], c["sizes"]) for c in weight["chunks"]] == [([0, 0], [4, 5]), ([4, 0], [4, 5])]
    for entry in _manifest(root / "twod")["sharded"]["tensors"].values():
        assert sum(math.prod(c["sizes"]) for c in entry["chunks"]) == math.prod(entry["shape"])


def test_no_file_we_write_is_a_pickle(root):
    for path in root.rglob("*"):
        if not path.is_file() or path.name.startswith("expected_"):
            continue
        head = path.read_bytes()[:8]
        assert head[:1] != b"\x80" and head[:2] != b"PK", path  # pickle protocol / torch zip
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            assert load_file(path) is not None
        else:
            assert path.name == ".lock", path


def test_a_damaged_chunk_is_named_and_latest_falls_back(root, tmp_path):
    import shutil

    shutil.copytree(root / "fsdp", tmp_path / "run")
    step = next((tmp_path / "run").glob("step_*"))
    chunk = _manifest(tmp_path / "run")["sharded"]["tensors"]["model.0.weight"]["chunks"][1]
    with open(step / chunk["file"], "r+b") as f:
        f.seek(chunk["data_offsets"][0])
        f.write(b"\xff\xff\xff\xff")
    with CheckpointManager(tmp_path / "run", read_only=True) as mgr:
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch in block 0 of the chunk at \\[4, 0\\]"):
            mgr.restore(1)


def test_convert_writes_the_full_model_streamed(root, tmp_path, capsys):
    from ckpt_plugins.cli import main as cli_main

    expected = load_file(root / "expected_twod.safetensors")
    assert cli_main(["convert", str(root / "twod"), str(tmp_path / "all.safetensors"), "--to", "safetensors"]) == 0
    flat = load_file(tmp_path / "all.safetensors")
    for key, value in expected.items():
        if key.startswith("model/"):
            assert torch.equal(flat["model." + key[6:]], value), key
    assert torch.equal(flat["optimizer.state.0.exp_avg"], expected["optim/0.weight/exp_avg"])
    assert cli_main(["convert", str(root / "twod"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights.keys() == {k[6:] for k in expected if k.startswith("model/")}
    model = cases.build("plain")
    model.load_state_dict(weights)  # what from_pretrained reads
    capsys.readouterr()


def test_inspect_and_verify_show_sharded_tensors_with_their_global_shapes(root, capsys):
    from ckpt_plugins.cli import main as cli_main

    step = next((root / "fsdp").glob("step_*"))
    assert cli_main(["inspect", str(step), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    entries = {e["key"]: e for e in info["entries"]}
    assert info["format_version"] == 4 and info["world_size"] == 2
    assert entries["model.0.weight"]["shape"] == [8, 5] and entries["model.0.weight"]["bytes"] == 160
    assert cli_main(["verify", str(root / "fsdp")]) == 0
    capsys.readouterr()
