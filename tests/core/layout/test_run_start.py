"""One start-of-run collision check (``CheckpointManager.start_run``), one exception type: a fresh
run into a directory with later checkpoints is refused; a resumed run replaces them only as its
own saves commit, after one warning that names them."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import StepExistsError


def _saved(root, steps=(4, 8, 12)) -> None:
    with CheckpointManager(root) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((8,), float(step))})


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_fresh_run_before_later_checkpoints_is_refused_with_the_callers_hint(tmp_path):
    _saved(tmp_path)
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(StepExistsError, match=r"steps \[4, 8, 12\].*step 0.*Resume with fit\(ckpt_path='last'\)"):
            mgr.start_run(0, resumed=False, hint="Resume with fit(ckpt_path='last').")
        assert mgr.steps() == [4, 8, 12]


def test_a_resumed_run_replaces_later_checkpoints_only_as_its_saves_commit(tmp_path, caplog):
    _saved(tmp_path)
    with CheckpointManager(tmp_path) as mgr:
        caplog.clear()
        assert mgr.start_run(4, resumed=True) == [8, 12]
        assert [w for w in _warnings(caplog) if "[8, 12]" in w] == _warnings(caplog) and len(_warnings(caplog)) == 1
        assert mgr.steps() == [4, 8, 12]  # nothing removed up front
        with pytest.raises(StepExistsError):
            mgr.save(4, {"w": torch.zeros(8)})  # at the resumed step: still a collision
        mgr.save(8, {"w": torch.full((8,), -8.0)})
        assert mgr.steps() == [4, 8]  # 8 replaced, 12 (a future this run left behind) removed
        assert torch.equal(mgr.restore(8)["w"], torch.full((8,), -8.0))
        mgr.save(10, {"w": torch.zeros(8)})
        with pytest.raises(StepExistsError):
            mgr.save(9, {"w": torch.zeros(8)})  # this run's own order still holds
        assert len(_warnings(caplog)) == 1


def test_a_resumed_run_between_later_checkpoints_saves_past_them(tmp_path):
    _saved(tmp_path)
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.start_run(4, resumed=True)
        mgr.save(6, {"w": torch.zeros(8)})
        mgr.wait()
        assert mgr.steps() == [4, 6]


def test_overwrite_lets_a_fresh_run_start_and_says_what_it_will_replace(tmp_path, caplog):
    _saved(tmp_path)
    with CheckpointManager(tmp_path, overwrite=True) as mgr:
        caplog.clear()
        assert mgr.start_run(0, resumed=False) == [4, 8, 12]
        assert len(_warnings(caplog)) == 1 and "[4, 8, 12]" in _warnings(caplog)[0]
        assert mgr.steps() == [4, 8, 12]


def test_nothing_later_nothing_said(tmp_path, caplog):
    _saved(tmp_path, steps=(4, 8))
    with CheckpointManager(tmp_path) as mgr:
        caplog.clear()
        assert mgr.start_run(8, resumed=True) == []
        assert _warnings(caplog) == []
        mgr.save(12, {"w": torch.zeros(8)})
        assert mgr.steps() == [4, 8, 12]


def test_saves_checked_while_the_later_ones_are_being_removed_pass_them(tmp_path):
    """The first commit removes the earlier run's later checkpoints on the writer thread; a save
    checked on the training thread meanwhile must not collide with those still being removed."""
    _saved(tmp_path, steps=(4, 8, 12, 16))
    with CheckpointManager(tmp_path, async_save=True, max_pending=2) as mgr:
        mgr.start_run(4, resumed=True)
        removing, release = threading.Event(), threading.Event()
        delete = mgr.layout.delete

        def held_delete(step: int) -> None:
            removing.set()
            release.wait(60)
            delete(step)

        mgr.layout.delete = held_delete
        try:
            mgr.save(6, {"w": torch.zeros(8)})
            assert removing.wait(60)  # step 6 committed; 8, 12 and 16 are being removed
            mgr.save(10, {"w": torch.ones(8)})  # checked now: 12 and 16 are still there
        finally:
            release.set()
        mgr.wait()
        assert mgr.steps() == [4, 6, 10]
