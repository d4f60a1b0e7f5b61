"""Errors about one entry of the state carry its ``key_path``, so adapters need not parse messages."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_plugins import CheckpointManager, CorruptCheckpointError, UnsupportedStateError


def test_unsupported_state_error_carries_the_key_path(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(UnsupportedStateError) as info:
            mgr.save(1, {"sched": {"fn": lambda x: x}, "w": torch.ones(1)})
        assert info.value.key_path == "sched.fn"
        with pytest.raises(UnsupportedStateError) as nested:
            mgr.save(1, {"optimizer": {"state": {0: {"obj": object()}}}})
        assert nested.value.key_path == "optimizer.state.0.obj"
        with pytest.raises(UnsupportedStateError) as root:
            mgr.save(1, object())
        assert root.value.key_path is None  # the state itself, not one key of it


def test_decoder_error_carries_the_key_path(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": {"w": torch.ones(2), "n": 1}})
    manifest = tmp_path / "step_1" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["parts"]["state"]["tree"]["model"]["n"] = {"$t": "no-such-tag"}
    manifest.write_text(json.dumps(doc))
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CorruptCheckpointError, match="unknown tag") as info:
            mgr.restore(1)
    assert info.value.key_path == "model.n"
