"""One "latest usable checkpoint" (``ckpt_plugins.restore.choose``): damaged ones are skipped, and
moved aside only when asked, never at construction and never an explicitly named path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.restore.choose import latest_usable


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _visible(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if not n.startswith("."))


def _saved(root: Path, steps=(1, 2, 3)) -> None:
    with CheckpointManager(root) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((64,), float(step))})


def test_a_damaged_newest_is_skipped_and_nothing_is_renamed(tmp_path):
    _saved(tmp_path)
    _flip(tmp_path / "step_3" / "state.safetensors")
    listing = _visible(tmp_path)
    with CheckpointManager(tmp_path) as mgr:
        assert _visible(tmp_path) == listing  # building a manager renames nothing
        choice = latest_usable(mgr.layout)
        assert (choice.step, choice.path) == (2, mgr.path_for(2))
        assert [d.step for d in choice.damaged] == [3] and choice.damaged[0].moved_to is None
        assert "state.safetensors: checksum mismatch" in choice.damaged[0].problems[0]
        assert torch.equal(mgr.restore("latest")["w"], torch.full((64,), 2.0))  # the same choice
        assert mgr.last_restore_report.step == 2
    assert _visible(tmp_path) == listing


def test_quarantine_moves_damaged_ones_aside_but_never_a_kept_path(tmp_path):
    _saved(tmp_path)
    _flip(tmp_path / "step_3" / "state.safetensors")
    (tmp_path / "step_2" / "state.safetensors").unlink()
    with CheckpointManager(tmp_path) as mgr:
        choice = latest_usable(mgr.layout, quarantine=True, keep=[str(tmp_path / "step_3")])
        assert choice.step == 1
        assert [(d.step, d.moved_to is not None) for d in choice.damaged] == [(3, False), (2, True)]
        assert (tmp_path / "step_3").is_dir() and not (tmp_path / "step_2").exists()
        assert Path(choice.damaged[1].moved_to).name.startswith("step_2.damaged-")
        assert mgr.steps() == [1, 3]


def test_folders_without_a_manifest_count_only_through_a_check(tmp_path):
    _saved(tmp_path, steps=(1,))
    foreign = tmp_path / "step_5"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"x")
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        assert latest_usable(mgr.layout).step == 1  # not ours, no check: not a checkpoint
        assert latest_usable(mgr.layout, foreign=lambda path: []).path == str(foreign)
        refused = latest_usable(mgr.layout, foreign=lambda path: [f"{path}: unreadable"])
        assert refused.step == 1 and refused.damaged[0].problems == (f"{foreign}: unreadable",)


def test_nothing_usable(tmp_path):
    _saved(tmp_path, steps=(1,))
    _flip(tmp_path / "step_1" / "state.safetensors")
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        choice = latest_usable(mgr.layout)
        assert (choice.step, choice.path, [d.step for d in choice.damaged]) == (None, None, [1])
    assert latest_usable(CheckpointManager(tmp_path / "empty", read_only=True).layout).step is None
