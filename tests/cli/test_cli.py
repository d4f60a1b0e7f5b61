"""The ckpt-plugins command line, run as a real console script and in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_plugins import CheckpointManager
from ckpt_plugins.cli import main


@pytest.fixture
def run_dir(tmp_path):
    with CheckpointManager(tmp_path / "run") as mgr:
        for step, loss in ((9, 0.9), (10, 0.5), (11, 0.7)):
            mgr.save(
                step,
                {"model": {"w": torch.full((4, 4), float(step)), "b": torch.zeros(4)}, "step": step},
                metrics={"loss": loss},
            )
    return tmp_path / "run"


def test_ls_shows_steps_metrics_and_reasons(run_dir, capsys):
    assert main(["ls", str(run_dir), "--keep-last", "1", "--keep-best", "1", "--monitor", "loss"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["STEP", "NAME", "FORMAT", "METRICS", "SIZE", "AGE", "KEPT", "BY"]
    rows = {line.split()[0]: line for line in out[1:4]}
    assert list(rows) == ["9", "10", "11"]
    assert out[4] == "rules: keep_last=1 keep_best=1 monitor=loss mode=min (command line)"
    assert "(would be pruned)" in rows["9"]
    assert "loss=0.5" in rows["10"] and "keep_best" in rows["10"] and "best" in rows["10"]
    assert "keep_last" in rows["11"] and "latest" in rows["11"]


def test_inspect_ours_reads_headers_only(run_dir, capsys):
    assert main(["inspect", str(run_dir / "step_10")]) == 0
    out = capsys.readouterr().out
    assert "step 10" in out and "metrics loss=0.5" in out
    assert "model.w" in out and "(4, 4)" in out and "float32" in out and "64 B" in out
    assert "step" in out and "int" in out


def test_inspect_foreign_safetensors(tmp_path, capsys):
    save_file({"layer.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "safetensors format" in out and "layer.weight" in out and "bfloat16" in out


def test_verify_directory_and_damage(run_dir, capsys):
    assert main(["verify", str(run_dir)]) == 0
    assert capsys.readouterr().out.count("OK") == 3
    data = bytearray((run_dir / "step_10" / "state.safetensors").read_bytes())
    data[-1] ^= 1
    (run_dir / "step_10" / "state.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "step_10/state.safetensors: checksum mismatch" in out


def test_prune_is_a_dry_run_unless_yes(run_dir, capsys):
    assert main(["prune", str(run_dir), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "delete  step 9" in out and "dry run" in out
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["step_10", "step_11", "step_9"]
    assert main(["prune", str(run_dir), "--keep-last", "1", "--yes"]) == 0
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["step_11"]


def test_diff(run_dir, capsys):
    assert main(["diff", str(run_dir / "step_9"), str(run_dir / "step_9")]) == 0
    assert capsys.readouterr().out.strip() == "identical"
    assert main(["diff", str(run_dir / "step_9"), str(run_dir / "step_10")]) == 1
    out = capsys.readouterr().out
    assert "~ model.w: values differ (max |A-B| = 1)" in out and "~ step: 9 vs 10" in out
    assert "model.b" not in out


def test_diff_across_formats(run_dir, tmp_path, capsys):
    torch.save({"model": {"w": torch.full((4, 4), 9.0)}}, tmp_path / "plain.pt")
    assert main(["diff", str(run_dir / "step_9"), str(tmp_path / "plain.pt")]) == 1
    out = capsys.readouterr().out
    assert "- model.b (only in A)" in out and "- step (only in A)" in out and "model.w" not in out


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    for command in ("ls", "prune"):
        assert main([command, str(tmp_path / "nowhere")]) == 2
        assert "nowhere: no such directory" in capsys.readouterr().err


def test_console_script_is_installed(run_dir):
    beside_python = Path(sys.executable).parent / "ckpt-plugins"
    exe = str(beside_python) if beside_python.exists() else shutil.which("ckpt-plugins")
    assert exe, "the ckpt-plugins console script is not on PATH (pip install -e .)"
    result = subprocess.run([exe, "verify", str(run_dir)], capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout
