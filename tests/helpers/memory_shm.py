"""The ``shm_of`` fixture of the memory-tier tests: every test's snapshots are removed afterwards,
leaked or not (import it into a test module)."""

from __future__ import annotations

import shutil

import pytest

from ckpt_plugins.memory.place import snapshot_root


@pytest.fixture
def shm_of():
    """``shm_of(directory)``: the shared-memory folder of a directory's snapshots (removed at the end)."""
    seen: list[str] = []

    def of(directory) -> str:
        root = snapshot_root("/dev/shm", str(directory))
        seen.append(root)
        return root

    yield of
    for root in seen:
        shutil.rmtree(root, ignore_errors=True)
