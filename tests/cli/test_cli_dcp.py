"""The command line on ``torch.distributed.checkpoint`` folders written by the real ``dcp.save``:
inspect, verify, and convert DCP -> ours -> DCP (and -> safetensors), bit-exact, with DCP's own
loader reading what ``--to dcp`` wrote; hostile metadata is UNSAFE and runs nothing."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckpt_plugins import CheckpointManager
from ckpt_plugins.cli import main
from ckpt_plugins.formats import read_foreign
from conftest import make_training_state
from dcp_states import assert_same, dcp_save


@pytest.fixture()
def dcp_dir(tmp_path):
    model, opt, _ = make_training_state()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 12, "tag": "run"}
    return dcp_save(state, tmp_path / "dcp")


def test_inspect_and_verify_a_dcp_folder(dcp_dir, capsys):
    assert main(["inspect", str(dcp_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "dcp"
    entries = {e["key"]: e for e in doc["entries"]}
    assert entries["model.fc1.weight"]["shape"] == [16, 8] and entries["model.fc1.weight"]["dtype"] == "float32"
    assert entries["step"]["dtype"] == "int"
    assert main(["verify", str(dcp_dir)]) == 0
    assert capsys.readouterr().out.startswith("OK")


def test_hostile_metadata_is_unsafe_in_verify_and_refused_by_inspect(dcp_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (dcp_dir / ".metadata").write_bytes(pickle.dumps(Payload()))
    assert main(["verify", str(dcp_dir)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("UNSAFE") and "posix.system" in out and ".metadata" in out
    assert main(["inspect", str(dcp_dir)]) == 2
    assert "not one of DCP's metadata classes" in capsys.readouterr().err
    assert main(["convert", str(dcp_dir), str(tmp_path / "out"), "--to", "ours"]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_dcp_to_ours_to_dcp_round_trip_is_bit_exact(dcp_dir, tmp_path, capsys):
    original = read_foreign(dcp_dir)
    ours = tmp_path / "converted" / "from_dcp"
    assert main(["convert", str(dcp_dir), str(ours), "--to", "ours"]) == 0
    assert "step 12" in capsys.readouterr().out
    assert sorted(os.listdir(ours)) == ["manifest.json", "state.safetensors"]  # no pickle written
    with CheckpointManager(ours.parent) as mgr:
        assert_same(mgr.restore(str(ours)), original)
        assert mgr.last_restore_report.step == 12
    back = tmp_path / "back"
    assert main(["convert", str(ours), str(back), "--to", "dcp"]) == 0
    assert_same(read_foreign(back), original)
    # DCP's own loader reads what --to dcp wrote, into a state of the same shapes
    target = {"model": {k: torch.empty_like(v) for k, v in original["model"].items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=back, no_dist=True)
    assert_same(target["model"], original["model"])
    # replacing an existing DCP folder works; a folder that is not one is refused, untouched
    assert main(["convert", str(ours), str(back), "--to", "dcp"]) == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    assert main(["convert", str(ours), str(tmp_path / "notes"), "--to", "dcp"]) == 2
    assert "not a DCP folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "notes") == ["a.txt"]
    assert [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".trash-"))] == []


def test_dcp_to_safetensors_and_as_step(dcp_dir, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(dcp_dir), str(out), "--to", "safetensors"]) == 0
    weights = load_file(out)
    original = read_foreign(dcp_dir)
    assert all(torch.equal(weights[f"model.{k}"], v) for k, v in original["model"].items())
    assert main(["convert", str(dcp_dir), str(tmp_path / "o"), "--to", "ours", "--as-step", "3"]) == 0
    with CheckpointManager(tmp_path) as mgr:
        mgr.restore(str(tmp_path / "o"))
        assert mgr.last_restore_report.step == 3
    assert main(["convert", str(dcp_dir), str(out), "--to", "safetensors", "--as-step", "3"]) == 2
    assert "--as-step applies to --to ours only" in capsys.readouterr().err
