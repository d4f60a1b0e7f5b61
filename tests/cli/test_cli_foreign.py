"""Every command on real Lightning and HF checkpoints: ours inside framework layouts, and the
frameworks' own files (``.ckpt``, Trainer-written ``checkpoint-N``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_runs import hf_runs, json_of, lightning_runs, run_cli
from safetensors.torch import load_file

from ckpt_plugins.cli import main


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    return lightning_runs(tmp_path_factory.mktemp("lightning"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_runs(tmp_path_factory.mktemp("hf"))


def visible(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if not n.startswith("."))


def test_inspect_lists_the_numpy_arrays_of_a_lightning_callback_checkpoint(lightning, capsys):
    assert main(["inspect", str(lightning["callback"] / "epoch=0-step=12.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "state_dict.body.0.weight" in out and "(32, 8)" in out
    assert "uint32" in out and "(624,)" in out  # numpy's RNG state, from the capture of every RNG


def test_inspect_key_column_of_a_lightning_checkpoint_fits_a_terminal(lightning):
    for path in (lightning["native"] / "epoch=0-step=12.ckpt", lightning["callback"] / "epoch=0-step=12.ckpt"):
        result = run_cli("inspect", path)
        assert result.returncode == 0, result.stderr
        widest = max(len(line) for line in result.stdout.splitlines())
        assert widest <= 120, f"{path.name}: a {widest}-character line"
        assert "state_dict.body.0.weight" in result.stdout


def test_inspect_looks_inside_our_hf_checkpoints(hf, capsys):
    assert main(["inspect", str(hf["full"] / "checkpoint-4")]) == 0
    out = capsys.readouterr().out
    assert "model.transformer.wte.weight" in out and "(64, 32)" in out
    assert "optimizer.state" in out and "trainer_state.global_step" in out
    assert "data_position" in out and "0 B of tensors" not in out
    doc = json_of("inspect", hf["lora"] / "checkpoint-4")
    keys = {e["key"] for e in doc["entries"]}
    assert any(k.startswith("adapter.") and "lora_A" in k for k in keys), sorted(keys)[:20]
    assert not any(k.startswith("model.") for k in keys)
    assert doc["format"] == "ckpt_plugins" and doc["step"] == 4 and doc["total_bytes"] > 0


def test_diff_tells_a_full_model_checkpoint_from_a_lora_one(hf, capsys):
    assert main(["diff", str(hf["full"] / "checkpoint-4"), str(hf["lora"] / "checkpoint-4")]) == 1
    out = capsys.readouterr().out
    assert "- model.transformer.wte.weight (only in A)" in out
    assert "+ adapter." in out and "identical" not in out
    doc = json_of("diff", hf["full"] / "checkpoint-2", hf["full"] / "checkpoint-4")
    assert doc["identical"] is False
    changed = {d["key"]: d for d in doc["differences"]}
    assert changed["model.transformer.wte.weight"]["change"] == "values"
    assert changed["model.transformer.wte.weight"]["max_abs_diff"] > 0


def test_restore_of_our_hf_checkpoint_path_returns_the_weights(hf):
    from ckpt_plugins import CheckpointManager

    folder = hf["full"] / "checkpoint-4"
    with CheckpointManager(hf["full"], read_only=True, dir_prefix="checkpoint-") as mgr:
        state = mgr.restore(str(folder))
        by_step = mgr.restore(4, include="model.*")
    assert {"model", "optimizer", "scheduler", "rng_state", "trainer_state", "data_position"} <= set(state)
    expected = load_file(folder / "model.safetensors")
    assert set(state["model"]) == set(expected)
    assert all(torch.equal(state["model"][k], v) for k, v in expected.items())
    assert state["trainer_state"]["global_step"] == 4
    assert set(by_step) == {"model"} and torch.equal(
        by_step["model"]["transformer.wte.weight"], expected["transformer.wte.weight"]
    )


@pytest.mark.parametrize("kind", ["plugin", "native"])
def test_ls_verify_prune_read_folders_of_lightning_checkpoints(lightning, kind, capsys):
    directory = lightning[kind]
    names = ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "epoch=0-step=12.ckpt"]
    assert main(["ls", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "no committed checkpoints" not in out and all(n in out for n in names)
    doc = json_of("ls", directory)
    assert [c["step"] for c in doc["checkpoints"]] == [4, 8, 12]
    assert {c["format"] for c in doc["checkpoints"]} == {"ckpt_plugins" if kind == "plugin" else "lightning"}
    assert doc["rules"] is None  # ModelCheckpoint decides what stays, not rules stored by us
    assert main(["verify", str(directory)]) == 0
    assert capsys.readouterr().out.count("OK") == 3
    assert main(["prune", str(directory), "--keep-last", "2"]) == 0
    assert "delete  step 4" in capsys.readouterr().out and visible(directory) == sorted(names)
    assert main(["prune", str(directory), "--keep-last", "2", "--yes"]) == 0
    assert visible(directory) == sorted(names[1:])


def test_ls_verify_prune_read_trainer_written_checkpoints(hf, capsys):
    directory = hf["native"]
    assert main(["ls", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-2" in out and "checkpoint-4" in out and "no committed" not in out
    doc = json_of("ls", directory)
    assert [(c["step"], c["format"]) for c in doc["checkpoints"]] == [(2, "hf"), (4, "hf")]
    assert "loss" in doc["checkpoints"][1]["metrics"]  # from trainer_state.json
    assert main(["verify", str(directory)]) == 0
    assert capsys.readouterr().out.count("OK") == 2
    assert main(["prune", str(directory), "--keep-last", "1", "--yes"]) == 0
    assert "checkpoint-2" not in visible(directory) and "checkpoint-4" in visible(directory)


def test_convert_reads_an_hf_run_folder(hf, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    assert main(["convert", str(hf["full"]), str(out), "--to", "safetensors"]) == 0
    assert "checkpoint-4" in capsys.readouterr().out
    weights = load_file(out)
    expected = load_file(hf["full"] / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(weights[f"model.{k}"], v) for k, v in expected.items())
    assert main(["convert", str(hf["full"]), str(tmp_path / "m.ckpt"), "--to", "lightning"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4" in err and "has no committed checkpoint" not in err and "--to safetensors" in err


def test_convert_of_a_missing_step_lists_the_steps_there(lightning, tmp_path, capsys):
    assert (
        main(["convert", str(lightning["callback"]), str(tmp_path / "m.ckpt"), "--to", "lightning", "--step", "99"])
        == 2
    )
    err = capsys.readouterr().err
    assert "step 99" in err and "8, 12" in err
    assert (
        main(["convert", str(lightning["callback"]), str(tmp_path / "m.ckpt"), "--to", "lightning", "--step", "8"]) == 0
    )
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["global_step"] == 8


def test_json_of_inspect_on_a_lightning_file(lightning):
    doc = json_of("inspect", lightning["native"] / "epoch=0-step=8.ckpt")
    entries = {e["key"]: e for e in doc["entries"]}
    assert doc["format"] == "lightning"
    assert entries["state_dict.body.0.weight"] == {
        "key": "state_dict.body.0.weight",
        "shape": [32, 8],
        "dtype": "float32",
        "bytes": 1024,
    }
    assert entries["global_step"]["shape"] is None and entries["global_step"]["dtype"] == "int"
    json.dumps(doc)
