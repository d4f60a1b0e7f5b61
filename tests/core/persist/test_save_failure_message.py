"""A failed write (disk full) names the step that failed and says the committed checkpoints are unchanged."""

from __future__ import annotations

import errno

import pytest
import torch

from ckpt_plugins import CheckpointManager


def test_disk_full_message_names_the_step_and_the_committed_checkpoints(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
        original = mgr.storage.open_write

        def open_write(path):
            if path.endswith(".safetensors"):
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return original(path)

        mgr.storage.open_write = open_write
        with pytest.raises(OSError) as info:
            mgr.save(2, {"w": torch.zeros(4)})
        mgr.storage.open_write = original
        assert mgr.steps() == [1]
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device: step 2 was not saved (writing state.safetensors)" in message
    assert f"the committed checkpoints in {tmp_path} are unchanged (latest: step 1)" in message
    assert "intact" not in message and not message.rstrip("'").endswith("safetensors"), message
    assert ".tmp-" not in message.rsplit(";", 1)[-1], "the temporary folder is not what survived"
