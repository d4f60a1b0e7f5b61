"""Direct I/O: tensor files written past the page cache are byte for byte the buffered ones.

Real files on the test's own disk (``O_DIRECT`` where it is supported), a real tmpfs where it is
not, a real file-size limit for a write that fails half way, and the fallback when the file
system accepts the flag but refuses the I/O.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.files.tensor_file import read_tensor_file, write_tensor_file
from ckpt_plugins.storage import LocalStorage, direct_io
from ckpt_plugins.storage.direct_io import ALIGN, BUFFER_BYTES, DirectWriter

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")

# Sizes around every boundary the writer has: the alignment, one buffer, two buffers (a swap).
EDGE_SIZES = [0, 1, ALIGN - 9, ALIGN, ALIGN + 1, BUFFER_BYTES - 1, BUFFER_BYTES + 3, 2 * BUFFER_BYTES + 4097]


def _tensors(total_bytes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(total_bytes)
    return {
        "big": torch.randint(0, 256, (total_bytes,), dtype=torch.uint8, generator=gen),
        "f32": torch.randn(3, 5, generator=gen),
        "i16": torch.arange(7, dtype=torch.int16),
    }


def _supports_direct(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_direct_and_buffered_files_are_identical(tmp_path, size):
    """Where the file system refuses O_DIRECT this compares the fallback; both must match."""
    tensors = _tensors(size)
    storage = LocalStorage()
    direct = write_tensor_file(storage, str(tmp_path / "d.safetensors"), tensors, {"k": "v"}, direct_io=True)
    buffered = write_tensor_file(storage, str(tmp_path / "b.safetensors"), tensors, {"k": "v"}, direct_io=False)
    assert direct == buffered
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert os.path.getsize(tmp_path / "d.safetensors") == direct.size  # padding trimmed
    back = read_tensor_file(storage, str(tmp_path / "d.safetensors"), expected=direct)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_the_flag_is_set_exactly_where_the_file_system_takes_it(tmp_path):
    supported = _supports_direct(tmp_path)  # probed independently of the writer
    with LocalStorage().open_write(str(tmp_path / "x")) as out:
        writer = DirectWriter.wrap(out)
        assert writer is not None and writer._direct == supported
        assert bool(fcntl.fcntl(out.fileno(), fcntl.F_GETFL) & os.O_DIRECT) == supported
        writer.write(b"abc" * 5000)
        assert writer.finish() == 15000
        assert not fcntl.fcntl(out.fileno(), fcntl.F_GETFL) & os.O_DIRECT  # handed back as opened
    assert (tmp_path / "x").read_bytes() == b"abc" * 5000


def _refuse_direct(monkeypatch) -> None:
    """What tmpfs before Linux 6.6 and many FUSE file systems do: F_SETFL with O_DIRECT fails."""
    real_fcntl = fcntl.fcntl

    def refusing_fcntl(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing_fcntl)


def test_a_file_system_refusing_the_flag_gets_plain_writes(tmp_path, monkeypatch):
    _refuse_direct(monkeypatch)
    with LocalStorage().open_write(str(tmp_path / "x")) as out:
        writer = DirectWriter.wrap(out)
        assert writer is not None and not writer._direct
        writer.write(b"xyz" * 3000)
        assert writer.finish() == 9000
    assert (tmp_path / "x").read_bytes() == b"xyz" * 3000


def test_refused_io_after_the_flag_was_accepted_falls_back(tmp_path, monkeypatch):
    """Some FUSE and network file systems accept O_DIRECT at open and fail the write itself."""
    real_write = os.write
    refused = []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", write)
    tensors = _tensors(BUFFER_BYTES + 10)
    record = write_tensor_file(LocalStorage(), str(tmp_path / "f.safetensors"), tensors)
    back = read_tensor_file(LocalStorage(), str(tmp_path / "f.safetensors"), expected=record)
    assert torch.equal(back["big"], tensors["big"])
    if _supports_direct(tmp_path):
        assert len(refused) == 1  # the first refused write switched the flag off for good


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_environment_switch_turns_it_off(tmp_path, monkeypatch, value):
    monkeypatch.setenv("CKPT_PLUGINS_DIRECT_IO", value)
    with LocalStorage().open_write(str(tmp_path / "x")) as out:
        assert DirectWriter.wrap(out) is None


def test_a_misspelt_environment_switch_is_a_clear_error(tmp_path, monkeypatch):
    from ckpt_plugins import ConfigError

    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
    monkeypatch.setenv("CKPT_PLUGINS_DIRECT_IO", "nope")
    with pytest.raises(ConfigError, match="CKPT_PLUGINS_DIRECT_IO='nope'.*use 1 or 0"):
        CheckpointManager(tmp_path)  # said when the manager is built, before any save
    monkeypatch.delenv("CKPT_PLUGINS_DIRECT_IO")
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [1] and torch.equal(mgr.restore(1)["w"], torch.ones(3))


def test_buffers_are_reused_and_no_thread_is_left_behind(tmp_path):
    storage = LocalStorage()
    write_tensor_file(storage, str(tmp_path / "warm.safetensors"), _tensors(BUFFER_BYTES * 2))
    pooled = len(direct_io._POOL._free)
    threads = threading.active_count()
    for i in range(5):
        write_tensor_file(storage, str(tmp_path / f"{i}.safetensors"), _tensors(BUFFER_BYTES * 2))
    assert len(direct_io._POOL._free) == pooled >= 2  # the same two buffers, handed back each time
    assert threading.active_count() == threads


def test_the_io_thread_can_be_stopped_mid_file_and_the_file_is_still_complete(tmp_path):
    """Lightning's test harness stops stray daemon threads that have ``stop()`` (and fails on any
    other): the direct-I/O thread is one, and stopping it while a file is being written finishes
    the queued writes; the rest of the file is written on the caller's thread (issue 12: a zombie
    ckpt-direct-io thread at teardown while the last async save was written)."""
    data = os.urandom(BUFFER_BYTES * 3 + 12345)
    path = tmp_path / "f.bin"
    with open(path, "wb") as out:
        writer = DirectWriter.wrap(out)
        assert writer is not None
        thread = writer._io
        assert thread.daemon and callable(thread.stop) and thread.name == "ckpt-direct-io"
        writer.write(data[: BUFFER_BYTES * 2])
        thread.stop()  # what the harness does, in the middle of the file
        assert not thread.is_alive()
        writer.write(data[BUFFER_BYTES * 2 :])
        assert writer.finish() == len(data)
    assert path.read_bytes() == data


CHILD = """
import json, signal, resource, sys, torch
from ckpt_plugins import CheckpointManager
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
with CheckpointManager(sys.argv[1], keep_last=2) as mgr:
    mgr.save(1, {"w": torch.ones(1024)})
    resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 20, 40 << 20))
    error = None
    try:
        mgr.save(2, {"w": torch.ones(16 << 20)})  # 64 MiB: fails inside the third buffer
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"error": error, "steps": mgr.steps(), "w": mgr.restore(1)["w"].sum().item()}))
"""


def test_a_write_failing_half_way_raises_and_keeps_the_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["error"] and "File too large" in result["error"] and "step 2" in result["error"]
    assert result["steps"] == [1] and result["w"] == 1024
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_staged_tensors_of_one_file_are_one_aligned_run():
    """The stager lays each file's tensors out contiguously, page-aligned, in the writer's order,
    so the writer hands one run of memory to the disk (no copy)."""
    from ckpt_plugins.files.tensor_file import _runs, file_layout
    from ckpt_plugins.persist.stager import HostStager

    tensors = {
        "state/a": torch.randn(1000),
        "state/b": torch.arange(5, dtype=torch.int16),
        "state/c": torch.randn(3, 3, dtype=torch.float64),
        "rank/r": torch.ones(7),
        "extra/f.safetensors/0": torch.zeros(2, dtype=torch.bool),
        "state/e": torch.empty(0),
    }
    stager = HostStager(1)
    staged = stager.stage(0, tensors).tensors
    assert all(torch.equal(staged[k], v) for k, v in tensors.items())
    for prefix in ("state/", "rank/", "extra/f.safetensors/"):
        group = {k[len(prefix) :]: v for k, v in staged.items() if k.startswith(prefix)}
        order, head, _ = file_layout(group, None)
        runs = list(_runs(group[k] for k in order))
        assert len(runs) == 1 and direct_io._address(runs[0]) % ALIGN == 0
        assert len(head) % ALIGN == 0  # the data section starts page-aligned in the file
    first = staged["state/a"].data_ptr()
    stager.stage(0, {k: v + 1 if v.dtype.is_floating_point else v for k, v in tensors.items()})
    assert stager.arena(0).views["state/a"].data_ptr() == first  # same shapes: the arena is reused


@pytest.mark.parametrize("refused", [False, True], ids=["direct", "refused"])
def test_aligned_memory_is_written_in_place(tmp_path, monkeypatch, refused):
    if refused:
        _refuse_direct(monkeypatch)
    from ckpt_plugins.persist.stager import _aligned_bytes

    memory = _aligned_bytes(3 * (1 << 20) + 100, pin=False, shared=False)
    memory.copy_(torch.randint(0, 256, memory.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    raw = memory.numpy().tobytes()
    with LocalStorage().open_write(str(tmp_path / "x")) as out:
        writer = DirectWriter.wrap(out)
        writer.write(b"h" * ALIGN)  # a page of header, then the aligned run
        writer.write(memoryview(memory.numpy())[: 3 << 20])  # not promised stable: copied
        assert writer._in_place == []
        writer.write(memoryview(memory.numpy()), stable=True)
        assert len(writer._in_place) == 1  # 3 MiB straight from `memory`; the last 100 bytes copied
        writer.write(memoryview(memory.numpy())[1:], stable=True)
        # Unaligned: with O_DIRECT it must go through the buffers; plain writes take any address.
        assert len(writer._in_place) == (1 if writer._direct else 2)
        writer.finish()
    assert (tmp_path / "x").read_bytes() == b"h" * ALIGN + raw[: 3 << 20] + raw + raw[1:]


def test_staged_extra_files_go_through_direct_io_and_seeking_writers_still_work(tmp_path):
    from ckpt_plugins.files.extra_files import StagedFile

    def seeking_save(f, value):  # writes, then goes back to patch its first bytes
        torch.save(value, f)
        f.seek(0)
        f.write(b"PK")

    opt = {"state": {0: {"exp_avg": torch.randn(600_000)}}, "param_groups": [{"lr": 0.1}]}
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(
            1,
            {"step": 1},
            extra_files={
                "optimizer.pt": StagedFile(opt, lambda f, v: torch.save(v, f)),
                "patched.pt": StagedFile(opt, seeking_save),
            },
        ).wait()
        assert mgr.verify(1) == []
    for name in ("optimizer.pt", "patched.pt"):
        back = torch.load(tmp_path / "step_1" / name, weights_only=True)
        assert torch.equal(back["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])


def test_stopping_the_io_thread_while_it_is_being_started_waits_for_it():
    """Lightning's stray-thread sweep may call stop() on a thread that start() has not finished
    starting (it is listed from then on); stop() must wait for it, not raise 'cannot join thread
    before it is started'."""

    class NotYetStarted(direct_io._IOThread):
        def start(self) -> None:  # construction only; the real start comes below
            pass

    thread = NotYetStarted()
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            thread.stop()
        except BaseException as exc:
            errors.append(exc)

    stopper = threading.Thread(target=stop)
    stopper.start()
    stopper.join(timeout=0.5)  # stop() is waiting for the thread to run (it raised at once before)
    threading.Thread.start(thread)
    stopper.join()
    thread.join()
    assert errors == []
    assert not thread.is_alive()
