"""Async saving: handles, callbacks, errors, busy policies, ordering, flush, overlap, buffer reuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from ckpt_plugins import CheckpointManager, ConfigError, SaveError
from conftest import HELPERS, make_training_state, state_of

HELPER = HELPERS / "async_exit.py"


def slow_writes(mgr: CheckpointManager, seconds: float, gate: threading.Event | None = None):
    """Make every file write of ``mgr`` take ``seconds`` (or wait for ``gate``)."""
    original = mgr.storage.open_write

    def open_write(path):
        if gate is not None:
            gate.wait(10)
        time.sleep(seconds)
        return original(path)

    mgr.storage.open_write = open_write


def failing_writes(mgr: CheckpointManager, failures: list[bool]):
    """Fail tensor-file writes with ENOSPC while ``failures`` is non-empty (pops one per write)."""
    original = mgr.storage.open_write

    def open_write(path):
        if path.endswith(".safetensors") and failures:
            failures.pop()
            raise OSError(28, "No space left on device (injected)", path)
        return original(path)

    mgr.storage.open_write = open_write


def test_save_returns_a_handle_before_the_commit(tmp_path):
    gate = threading.Event()
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        slow_writes(mgr, 0, gate)
        handle = mgr.save(1, {"w": torch.ones(1000)})
        assert not handle.done() and mgr.steps() == []
        assert handle.step == 1 and handle.path.endswith("step_1")
        gate.set()
        assert handle.wait(timeout=10) == handle.path
        assert handle.done() and handle.exception() is None
        assert mgr.steps() == [1]


def test_on_commit_callbacks_run_after_the_commit(tmp_path):
    seen = []

    def manager_cb(step, path):
        seen.append(("manager", step, os.path.exists(os.path.join(path, "manifest.json"))))

    with CheckpointManager(tmp_path, async_save=True, on_commit=manager_cb) as mgr:
        mgr.save(1, {"a": 1}, on_commit=lambda s, p: seen.append(("save", s, os.path.isdir(p))))
        mgr.save(2, {"a": 2})
        mgr.wait()
    assert seen == [("manager", 1, True), ("save", 1, True), ("manager", 2, True)]


def test_a_failing_callback_does_not_fail_the_save(tmp_path, caplog):
    with CheckpointManager(tmp_path, async_save=True, on_commit=lambda s, p: 1 / 0) as mgr:
        mgr.save(1, {"a": 1}).wait()
        assert mgr.steps() == [1]
    assert "on_commit callback" in caplog.text


def test_background_error_surfaces_on_wait_then_never_again(tmp_path):
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
        failing_writes(mgr, [True])
        handle = mgr.save(2, {"w": torch.ones(3)})
        with pytest.raises(SaveError, match=r"saving step 2 failed: .*No space left on device"):
            mgr.wait()
        assert isinstance(handle.exception(), OSError)
        mgr.wait()  # reported once
        assert mgr.steps() == [1]
        assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
        mgr.save(3, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [1, 3]


def test_background_error_surfaces_on_next_save(tmp_path):
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        failing_writes(mgr, [True])
        mgr.save(1, {"w": torch.ones(3)})
        mgr._persister.engine.flush()
        with pytest.raises(SaveError, match="saving step 1 failed"):
            mgr.save(2, {"w": torch.ones(3)})
        mgr.save(2, {"w": torch.ones(3)}).wait()


def test_the_engine_forgets_finished_saves_but_not_an_unseen_error(tmp_path):
    """Every async save's handle was kept for the whole run (only a failure's was ever dropped):
    memory and the per-save scan of earlier handles grew with the number of saves."""
    with CheckpointManager(tmp_path, async_save=True, keep_last=2) as mgr:
        engine = mgr._persister.engine
        for step in range(1, 41):
            mgr.save(step, {"w": torch.ones(3)}).wait()
        assert len(engine._handles) <= 2
        failing_writes(mgr, [True])
        mgr.save(41, {"w": torch.ones(3)})
        engine.flush()
        with pytest.raises(SaveError, match="saving step 41 failed"):  # kept until it is raised
            mgr.save(42, {"w": torch.ones(3)})
        mgr.save(42, {"w": torch.ones(3)}).wait()
        assert len(engine._handles) <= 2


def test_background_error_surfaces_on_close(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=True)
    failing_writes(mgr, [True])
    mgr.save(1, {"w": torch.ones(3)})
    with pytest.raises(SaveError, match="No space left"):
        mgr.close()


def test_on_error_warn_keeps_training(tmp_path, caplog):
    with CheckpointManager(tmp_path, async_save=True, on_error="warn") as mgr:
        failing_writes(mgr, [True])
        mgr.save(1, {"w": torch.ones(3)})
        mgr.wait()
        mgr.save(2, {"w": torch.ones(3)}).wait()
        assert mgr.steps() == [2]
    assert "on_error='warn'" in caplog.text


def test_sync_error_raises_immediately_and_deletes_nothing(tmp_path):
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
        failing_writes(mgr, [True])
        with pytest.raises(OSError, match="No space left"):
            mgr.save(2, {"w": torch.ones(3)})
        assert mgr.steps() == [1]
        assert sorted(os.listdir(tmp_path)) == [".lock", "step_1"]


def test_on_busy_skip_skips_with_a_warning(tmp_path, caplog):
    gate = threading.Event()
    with CheckpointManager(tmp_path, async_save=True, max_pending=1, on_busy="skip") as mgr:
        slow_writes(mgr, 0, gate)
        first = mgr.save(1, {"w": torch.ones(3)})
        assert mgr.save(2, {"w": torch.ones(3)}) is None
        gate.set()
        first.wait()
        assert mgr.save(3, {"w": torch.ones(3)}) is not None
        mgr.wait()
        assert mgr.steps() == [1, 3]
    assert "skipping the save of step 2" in caplog.text


def test_on_busy_wait_blocks_until_a_slot_frees(tmp_path):
    gate = threading.Event()
    with CheckpointManager(tmp_path, async_save=True, max_pending=1, on_busy="wait") as mgr:
        slow_writes(mgr, 0, gate)  # step 1's writes wait for the gate
        first = mgr.save(1, {"w": torch.ones(3)})
        assert not first.done()
        release = threading.Timer(0.2, gate.set)  # opens the gate while save(2) waits, or after
        release.start()
        mgr.save(2, {"w": torch.ones(3)})
        gate_open_when_second_returned = gate.is_set()
        release.join()
        # save(2) returned only once step 1's writes could go on and freed the one staging slot
        assert gate_open_when_second_returned
        mgr.wait()
        assert mgr.steps() == [1, 2]


def test_max_pending_two_allows_two_in_flight(tmp_path):
    gate = threading.Event()
    with CheckpointManager(tmp_path, async_save=True, max_pending=2, on_busy="skip") as mgr:
        slow_writes(mgr, 0, gate)
        assert mgr.save(1, {"w": torch.ones(3)}) is not None
        assert mgr.save(2, {"w": torch.ones(3)}) is not None
        assert mgr.save(3, {"w": torch.ones(3)}) is None
        gate.set()
        mgr.wait()
        assert mgr.steps() == [1, 2]


def test_retention_deletes_only_after_the_commit_that_triggered_it(tmp_path):
    events = []
    with CheckpointManager(tmp_path, async_save=True, keep_last=1, max_pending=3) as mgr:
        commit, delete = mgr.layout.commit, mgr.layout.delete
        mgr.layout.commit = lambda temp, manifest, **kw: (
            events.append(("commit", manifest.step)),
            commit(temp, manifest, **kw),
        )[1]
        mgr.layout.delete = lambda step: (events.append(("delete", step)), delete(step))[1]
        for step in range(1, 6):
            mgr.save(step, {"w": torch.full((100,), float(step))})
        mgr.wait()
        assert mgr.steps() == [5]
    assert events == [
        ("commit", 1),
        ("commit", 2),
        ("delete", 1),
        ("commit", 3),
        ("delete", 2),
        ("commit", 4),
        ("delete", 3),
        ("commit", 5),
        ("delete", 4),
    ]


def test_staging_buffers_are_allocated_once_and_reused(tmp_path):
    model, _opt, _sched = make_training_state()
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, {"model": model.state_dict()}).wait()
        first = {k: v.data_ptr() for k, v in mgr._persister.stager.arena(0).views.items()}
        size = mgr._persister.stager.staged_bytes()
        for step in (2, 3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            mgr.save(step, {"model": model.state_dict()}).wait()
        assert {k: v.data_ptr() for k, v in mgr._persister.stager.arena(0).views.items()} == first
        assert mgr._persister.stager.staged_bytes() == size
        restored = mgr.restore(3)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(restored[key], value)


def test_staged_copy_is_isolated_from_later_updates(tmp_path):
    """Safe mode: once save() returns, training may change the tensors freely."""
    gate = threading.Event()
    w = torch.zeros(1000)
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        slow_writes(mgr, 0, gate)
        mgr.save(1, {"w": w})
        w.add_(5.0)
        gate.set()
        mgr.wait()
        assert torch.equal(mgr.restore(1)["w"], torch.zeros(1000))


def test_overlap_mode_checkpoint_equals_state_before_next_optimizer_step(tmp_path):
    model, opt, _sched = make_training_state()
    batch = torch.randn(4, 8)
    with CheckpointManager(tmp_path, async_save=True, snapshot="overlap") as mgr:
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        expected_opt = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
        mgr.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        # forward and backward may run while the copy is in progress ...
        opt.zero_grad()
        model(batch).pow(2).mean().backward()
        mgr.wait_for_snapshot()  # ... but the optimizer step must wait for it
        opt.step()
        mgr.wait()
        restored = mgr.restore(1)
    for key, value in expected.items():
        assert torch.equal(restored["model"][key], value)
    for key, value in expected_opt.items():
        assert torch.equal(restored["optimizer"]["state"][0][key], value)
    assert not torch.equal(model.state_dict()["fc1.weight"], expected["fc1.weight"])


def _run_helper(tmp_path, mode: str, send_sigterm: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), str(tmp_path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "save submitted"
    if send_sigterm:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("mode", ["exit", "sigterm"])
def test_pending_save_is_flushed_at_exit_and_on_sigterm(tmp_path, mode):
    result = _run_helper(tmp_path, mode, send_sigterm=mode == "sigterm")
    if mode == "sigterm":
        assert result.returncode == -signal.SIGTERM, result.stderr
        assert "SIGTERM: waiting for 1 manager(s)" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [7]
        assert torch.equal(mgr.restore(7)["w"], torch.arange(10.0))


def test_writer_process_writes_the_same_checkpoints(tmp_path):
    model, opt, sched = make_training_state()
    with CheckpointManager(tmp_path, async_save=True, writer="process", keep_last=2) as mgr:
        mgr._persister.process_writer.wait_ready()  # until then the writer thread writes (a short run never waits)
        for step in (1, 2, 3):
            mgr.save(step, state_of(model, opt, sched), metrics={"loss": 1.0 / step})
        mgr.wait()
        assert mgr.steps() == [2, 3]
        restored = mgr.restore("latest")
        assert all(block.is_shared() for block in mgr._persister.stager.arena(0).memory.values())
    for key, value in model.state_dict().items():
        assert torch.equal(restored["model"][key], value)


def test_writer_process_gets_each_arena_once_and_follows_shape_changes(tmp_path):
    with CheckpointManager(tmp_path, async_save=True, writer="process") as mgr:
        mgr._persister.process_writer.wait_ready()
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((64, 64), float(step)), "b": torch.arange(step, step + 3)}).wait()
        writer = mgr._persister.process_writer
        assert writer._sent == {0: mgr._persister.stager.arena(0).generation}
        first = mgr._persister.stager.arena(0).generation
        mgr.save(4, {"w": torch.full((8, 8), 4.0), "b": torch.arange(5)}).wait()  # new shapes
        assert writer._sent == {0: mgr._persister.stager.arena(0).generation} != {0: first}
        for step in (1, 2, 3):
            assert torch.equal(mgr.restore(step)["w"], torch.full((64, 64), float(step)))
        assert torch.equal(mgr.restore(4)["w"], torch.full((8, 8), 4.0))


def test_writer_process_on_remote_storage_is_refused_without_holding_the_lock():
    url = "memory://ckpt-process-writer"
    with pytest.raises(ConfigError, match="writer='process' works with local directories only"):
        CheckpointManager(url, async_save=True, writer="process")
    with CheckpointManager(url) as mgr:  # the refused manager left no lock behind
        mgr.save(1, {"w": torch.ones(2)})
        assert mgr.steps() == [1]


def test_writer_process_errors_surface(tmp_path):
    with CheckpointManager(tmp_path, async_save=True, writer="process") as mgr:
        mgr._persister.process_writer.wait_ready()
        mgr.save(1, {"w": torch.ones(3)}).wait()
        temp = tmp_path / ".tmp-step_2-fixed"
        (temp / "state.safetensors").mkdir(parents=True)  # the child's open() will fail
        mgr.layout.new_temp_dir = lambda step, token=None, name=None: str(temp)
        handle = mgr.save(2, {"w": torch.ones(3)})
        with pytest.raises(SaveError, match="Is a directory"):
            mgr.wait()
        assert isinstance(handle.exception(), IsADirectoryError)
        assert mgr.steps() == [1] and not temp.exists()


UNGUARDED_SCRIPT = """
import sys, torch
from ckpt_plugins import CheckpointManager, SaveError
# No `if __name__ == "__main__":` guard: the spawned writer re-runs this file, finds the
# directory locked by its parent, and exits with an error before writing anything.
try:
    with CheckpointManager(sys.argv[1], async_save=True, writer="process") as mgr:
        mgr._persister.process_writer.wait_ready()  # saves made before it is ready are written by the writer thread
        mgr.save(1, {"w": torch.ones(3)}).wait()
except SaveError as exc:
    print("SaveError:", exc)
"""


def test_writer_process_dying_at_start_up_is_an_error_not_a_hang(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "writer process died" in proc.stdout and "import-safe" in proc.stdout, proc.stdout
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.steps() == []


def test_repeated_sigterm_while_saving_terminates_cleanly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), str(tmp_path), "loop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "save submitted"
    time.sleep(0.5)
    for _ in range(20):  # each one lands somewhere inside save(), queue locks included
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    proc.communicate(timeout=60)  # a deadlocked handler would hang here
    assert proc.returncode == -signal.SIGTERM
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() and all(mgr.verify(step) == [] for step in mgr.steps())


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX scheduling priorities")
def test_writer_nice_lowers_the_writer_threads_priority(tmp_path):
    with CheckpointManager(tmp_path, async_save=True, writer_nice=10) as mgr:
        mgr.save(1, {"w": torch.ones(4)}).wait()
        tid = mgr._persister.engine._thread.native_id
        # niceness tops out at 19: the suite itself may run under `nice`
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
    with CheckpointManager(tmp_path / "b", async_save=True) as mgr:  # default: unchanged
        mgr.save(1, {"w": torch.ones(4)}).wait()
        tid = mgr._persister.engine._thread.native_id
        assert os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0)
