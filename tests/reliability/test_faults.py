"""Storage faults: a failed save raises clearly, shows nothing partial, and loses nothing.

* ENOSPC and EIO injected at every write of a save, in turn (``faulty://``, an fsspec file system).
* A real full file system (a 2 MiB tmpfs; RLIMIT_FSIZE where mounting is not permitted).
* A directory that stops being writable (permission bits; as root, without the capabilities that
  bypass them), also from a checkout inside a 0700 folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_plugins import CheckpointManager, SaveError
from conftest import HELPERS, ROOT
from faults import FaultyMemoryFileSystem, reset_faulty

CHILD = HELPERS / "fault_child.py"


def _writes_per_save(url: str, async_save: bool = False) -> int:
    """Writes of one save: staged (async) tensors of a file are one run of memory, so fewer."""
    with CheckpointManager(url, async_save=async_save) as mgr:
        before = FaultyMemoryFileSystem.writes
        mgr.save(0, _state(0)).wait()
        return FaultyMemoryFileSystem.writes - before


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((16, 16), float(step)), "b": torch.arange(4) + step}, "step": step}


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EIO])
def test_injected_write_fault_at_every_write(async_save, fault):
    reset_faulty()
    writes = _writes_per_save("faulty://probe", async_save)
    assert writes >= 3  # header, tensor data, manifest at least
    for n in range(1, writes + 1):
        reset_faulty()
        url = f"faulty://run-{n}"
        with CheckpointManager(url, keep_last=1, async_save=async_save) as mgr:
            mgr.save(1, _state(1))
            mgr.wait()
            FaultyMemoryFileSystem.arm(n, fault)
            if async_save:
                mgr.save(2, _state(2))
                with pytest.raises(SaveError, match=os.strerror(fault)):
                    mgr.wait()
            else:
                with pytest.raises(OSError, match=os.strerror(fault)):
                    mgr.save(2, _state(2))
            FaultyMemoryFileSystem.disarm()
            assert mgr.steps() == [1], f"fault at write {n}: {mgr.steps()}"
            assert torch.equal(mgr.restore("latest")["model"]["w"], torch.full((16, 16), 1.0))
            hidden = [name for name in mgr.storage.listdir(mgr.root) if name.startswith(".tmp")]
            assert hidden == [], f"fault at write {n} left {hidden}"
            mgr.save(3, _state(3))  # the next save works, and only then does retention delete
            mgr.wait()
            assert mgr.steps() == [3]
    reset_faulty()


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str = "2m"):
    """A real tiny tmpfs when mounting is permitted; otherwise None (caller uses RLIMIT_FSIZE)."""
    path.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (600 * 1024, 600 * 1024))


def test_real_disk_full_keeps_existing_checkpoints(tmp_path):
    target = tmp_path / "small"
    with _small_filesystem(target) as mounted:
        proc = subprocess.run(
            [sys.executable, str(CHILD), str(target), "fill"],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=None if mounted else _limit_file_size,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])
    expected = "No space left on device" if mounted else "File too large"
    assert len(result["errors"]) == 1 and expected in result["errors"][0], result
    assert result["steps"] and result["restored"] == result["steps"]
    assert result["leftovers"] == []


def _private_checkout(tmp_path: Path) -> Path:
    """A copy of the package and of the child inside a folder only its owner may enter, as a clone
    in root's 0700 home is."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(
        ROOT / "ckpt_plugins", private / "checkout" / "ckpt_plugins", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(CHILD, private / "checkout" / CHILD.name)
    return private / "checkout"


@pytest.mark.parametrize("checkout", ["this checkout", "a copy in a 0700 folder"])
def test_directory_that_is_not_writable(tmp_path, checkout):
    """As root, the child gives up the capabilities that bypass permission bits; it used to become
    nobody, which could then not import the rest of the library from a checkout in a 0700 folder."""
    base = tmp_path / "checkpoints"
    base.mkdir()
    child, env = CHILD, dict(os.environ)
    if checkout != "this checkout":
        copy = _private_checkout(tmp_path)
        child, env["PYTHONPATH"] = copy / CHILD.name, str(copy)
    try:
        proc = subprocess.run(
            [sys.executable, str(child), str(base), "readonly"], capture_output=True, text=True, timeout=120, env=env
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])
    finally:
        for root, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        os.chmod(base, 0o755)
    errors = result["errors"]
    assert any(e.startswith("sync PermissionError") and "Permission denied" in e for e in errors), errors
    assert any(e.startswith("async SaveError") and "Permission denied" in e for e in errors), errors
    assert any(e.startswith("open NotWritableError") and "read_only=True" in e for e in errors), errors
    assert result["steps"] == [[1], [1]] and result["restored"] == [1, 1]
    assert result["read_only_restore"] == 1
