"""CheckpointManager: save/restore round trips, retention, overwrite rules, layout, locking."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from ckpt_plugins import (
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    LockedError,
    RestoreError,
    StepExistsError,
)
from ckpt_plugins.files.tensor_file import write_tensor_file
from ckpt_plugins.storage import LocalStorage
from conftest import TinyNet, make_training_state, state_of


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=False):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy
        assert a.dtype == b.dtype and (a == b).all()
    else:
        assert a == b


def test_round_trip_full_training_state(tmp_path, training_state):
    state = state_of(*training_state)
    with CheckpointManager(tmp_path / "ck") as mgr:
        handle = mgr.save(10, state, metrics={"loss": 0.5})
        assert handle.done() and handle.exception() is None
        assert handle.path.endswith("step_10")
        restored = mgr.restore("latest")
    assert_same(dict(state["model"]), dict(restored["model"]))
    assert_same(state["optimizer"], restored["optimizer"])
    assert_same(state["scheduler"], restored["scheduler"])
    assert_same(state["rng"]["python"], restored["rng"]["python"])
    assert restored["epoch"] == 3


def test_restored_state_resumes_training_exactly(tmp_path):
    model, opt, sched = make_training_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(2, state_of(model, opt, sched))
        batch = torch.randn(4, 8)

        def step(m, o):
            o.zero_grad()
            m(batch).pow(2).mean().backward()
            o.step()

        step(model, opt)
        model2 = TinyNet()
        opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        mgr.restore("latest", target={"model": model2, "optimizer": opt2}, include=["model", "optimizer"])
        step(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=False):
        assert torch.equal(p, q)


def test_steps_sorted_naturally_and_latest(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        for step in (9, 10, 100):
            mgr.save(step, {"x": torch.tensor(step)})
        assert mgr.steps() == [9, 10, 100]
        assert mgr.latest_step() == 100
        assert mgr.best_step() is None
        assert sorted(os.listdir(tmp_path)) == [".lock", "step_10", "step_100", "step_9"]
        assert mgr.restore(9)["x"].item() == 9


def test_empty_directory_queries(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [] and mgr.latest_step() is None
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint to restore as 'latest'"):
            mgr.restore("latest")
        with pytest.raises(CheckpointNotFoundError, match=r"step 5 .*available steps: \[\]"):
            mgr.restore(5)


def test_keep_last_and_best_with_real_deletions(tmp_path):
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.7, 5: 0.8, 6: 0.6}
    with CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss", mode="min") as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})
        assert mgr.steps() == [2, 5, 6]
        assert mgr.best_step() == 2
        assert mgr.restore("best")["w"][0].item() == 2.0


def test_keep_every_n_steps_survives_keep_last(tmp_path):
    with CheckpointManager(tmp_path, keep_last=1, keep_every_n_steps=5) as mgr:
        for step in range(1, 12):
            mgr.save(step, {"s": step})
        assert mgr.steps() == [5, 10, 11]


def test_no_rule_keeps_everything(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        for step in range(5):
            mgr.save(step, {"s": step})
        assert mgr.steps() == [0, 1, 2, 3, 4]


def test_restored_checkpoint_is_protected_until_a_newer_one_commits(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"s": step})
    with CheckpointManager(tmp_path, keep_last=1, overwrite=True) as mgr:
        mgr.restore(1)
        mgr.save(1, {"s": 11})  # overwrite at the restored step: 2 and 3 go, 1 stays
        assert mgr.steps() == [1]
        assert mgr.restore(1)["s"] == 11


def test_protection_of_resumed_step(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):
            mgr.save(step, {"s": step})
    with CheckpointManager(tmp_path, keep_last=1, keep_every_n_steps=100) as mgr:
        mgr.restore(1)
        # Step 3 is newer than the restored step, so protection ends with its commit.
        mgr.save(3, {"s": 3})
        assert mgr.steps() == [3]


def test_protected_steps_outlive_keep_last_until_replaced(tmp_path):
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, {"s": 1})
        mgr.protect([1])  # e.g. the Trainer's best_global_step
        for step in (2, 3):
            mgr.save(step, {"s": step})
        mgr.wait()
        assert mgr.steps() == [1, 3]
        assert mgr.retention().keep[1] == ["protected"]
        mgr.protect([])  # no longer referred to: the next prune removes it
        mgr.save(4, {"s": 4})
        mgr.wait()
        assert mgr.steps() == [4]


@pytest.mark.parametrize("steps", [[-1], ["3"], [True], [1.5]])
def test_protect_rejects_what_is_not_a_step(tmp_path, steps):
    with CheckpointManager(tmp_path) as mgr, pytest.raises(ConfigError, match="protect"):
        mgr.protect(steps)


def test_save_at_or_before_existing_step_is_an_error(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(10, {"a": 1})
        mgr.save(20, {"a": 2})
        with pytest.raises(StepExistsError, match=r"cannot save step 10 .*\[10, 20\].*overwrite=True"):
            mgr.save(10, {"a": 3})
        with pytest.raises(StepExistsError, match=r"step\(s\) \[20\]"):
            mgr.save(15, {"a": 3})
        assert mgr.steps() == [10, 20]
        assert mgr.restore(10)["a"] == 1


def test_overwrite_replaces_and_removes_later(tmp_path):
    with CheckpointManager(tmp_path, overwrite=True) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, {"a": step})
        mgr.save(20, {"a": -20})
        assert mgr.steps() == [10, 20]
        assert mgr.restore("latest")["a"] == -20
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") and n != ".lock"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_last=0), "keep_last"),
        (dict(keep_best=2), "monitor"),
        (dict(mode="lowest", monitor="loss"), "mode"),
        (dict(max_pending=0), "max_pending"),
        (dict(on_busy="drop"), "on_busy"),
        (dict(snapshot="overlap"), "async_save=True"),
        (dict(on_error="ignore"), "on_error"),
    ],
)
def test_bad_options_name_the_option(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CheckpointManager(tmp_path, **kwargs)


def test_bad_step_and_metrics(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ConfigError, match="step must be a non-negative integer"):
            mgr.save(-1, {})
        with pytest.raises(ConfigError, match="metric 'acc' must be a number"):
            mgr.save(1, {}, metrics={"acc": "high"})
        mgr.save(1, {}, metrics={"loss": torch.tensor(0.25)})
        assert mgr.records()[0].metrics == {"loss": 0.25}


def test_leftovers_are_cleaned_and_nothing_else(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"a": 1})
    for leftover in (".tmp-step_2-abc", ".trash-step_0-def"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "state.safetensors").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step_3").mkdir()  # no manifest: not committed, never listed
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "step_1", "step_3"]


def test_interrupted_overwrite_puts_the_old_checkpoint_back(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, {"a": 5})
    os.rename(tmp_path / "step_5", tmp_path / ".replaced-step_5-0123456789ab")
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [5]
        assert mgr.restore(5)["a"] == 5


def test_second_manager_on_same_directory_is_refused(tmp_path):
    with CheckpointManager(tmp_path):
        with pytest.raises(LockedError, match=r"\.lock is held by process \d+ .*another CheckpointManager"):
            CheckpointManager(tmp_path)
    CheckpointManager(tmp_path).close()  # released on close


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, caplog):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"a": 1})
    assert "taking over the lock" in caplog.text


def test_memory_filesystem(tmp_path):
    import fsspec

    url = "memory://ckpt-test-run"
    with CheckpointManager(url, keep_last=2) as mgr:
        for step in range(4):
            mgr.save(step, {"w": torch.arange(4) * step})
        assert mgr.steps() == [2, 3]
        assert torch.equal(mgr.restore("latest")["w"], torch.arange(4) * 3)
    fsspec.filesystem("memory").rm("/ckpt-test-run", recursive=True)


# --- damage and fallback ---------------------------------------------------------------------


def _three_checkpoints(path):
    with CheckpointManager(path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((64,), float(step)), "step": step})


@pytest.mark.parametrize(
    "damage, named",
    [
        ("flip", "checksum mismatch"),
        ("truncate", "size is"),
        ("remove_tensors", "missing"),
        ("garble_manifest", "manifest is not valid JSON"),
    ],
)
def test_latest_falls_back_explicit_raises(tmp_path, caplog, damage, named):
    _three_checkpoints(tmp_path)
    newest = tmp_path / "step_3"
    tensors = newest / "state.safetensors"
    if damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "remove_tensors":
        tensors.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore("latest")["step"] == 2
        assert "checkpoint step 3 is damaged" in caplog.text and named in caplog.text
        assert "falling back to step 2" in caplog.text
        with pytest.raises(CorruptCheckpointError, match=named):
            mgr.restore(3)


# --- partial restore ---------------------------------------------------------------------------


def test_include_exclude_rename_and_report(tmp_path, training_state):
    state = state_of(*training_state)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        only_model = mgr.restore(1, include="model.*")
        assert list(only_model) == ["model"]
        assert mgr.last_restore_report.tensors_read == len(state["model"])
        no_opt = mgr.restore(1, exclude=["optimizer", "scheduler"])
        assert set(no_opt) == {"model", "rng", "epoch"}
        renamed = mgr.restore(1, include="model", rename={"model.fc1.": "model.encoder."})
        assert set(renamed["model"]) == {"encoder.weight", "encoder.bias", "fc2.weight", "fc2.bias"}


def test_strict_target_reports_and_tolerant_mode(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"a": torch.ones(3), "b": torch.ones(2, 2), "extra": 1})
        target = {"a": torch.zeros(3), "b": torch.zeros(3), "c": torch.zeros(1)}
        with pytest.raises(RestoreError) as info:
            mgr.restore(1, target=target)
        message = str(info.value)
        assert "missing in checkpoint: c" in message and "unexpected" not in message  # no target asks for extra
        assert "b (checkpoint (2, 2) torch.float32, target (3,) torch.float32)" in message
        assert torch.equal(target["a"], torch.zeros(3)), "a failed strict restore changed the target"
        mgr.restore(1, target=target, strict=False)
        report = mgr.last_restore_report
        assert torch.equal(target["a"], torch.ones(3))
        assert report.loaded == ["a"] and report.missing == ["c"] and report.unexpected == ["extra"]
        assert len(report.mismatched) == 1


def test_module_target_with_mismatch_is_tolerated(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": TinyNet(16).state_dict()})
        wider = TinyNet(32)
        with pytest.raises(RestoreError, match="model.fc1.weight"):
            mgr.restore(1, target={"model": wider})
        mgr.restore(1, target={"model": wider}, strict=False)
        assert sorted(mgr.last_restore_report.loaded) == ["model.fc2.bias"]


def test_map_location_meta_free_cpu(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
        assert mgr.restore(1, map_location=torch.device("cpu"))["w"].device.type == "cpu"


# --- format versions -------------------------------------------------------------------------


def test_version_1_checkpoint_is_migrated(tmp_path):
    """A hand-made checkpoint in the pre-release format 1 (one top-level tree, file triples)."""
    from ckpt_plugins.tree.codec import flatten_state

    folder = tmp_path / "step_7"
    folder.mkdir()
    flat = flatten_state({"w": torch.arange(3.0), "note": "old"})
    record = write_tensor_file(LocalStorage(), str(folder / "state.safetensors"), flat.tensors)
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": "ckpt_plugins",
                "format_version": 1,
                "step": 7,
                "wall_time": 1.0,
                "metrics": {"loss": 0.1},
                "tree": flat.tree,
                "tensor_file": "state.safetensors",
                "files": [["state.safetensors", record.size, record.xxh3_64]],
            }
        )
    )
    with CheckpointManager(tmp_path, monitor="loss") as mgr:
        assert mgr.steps() == [7] and mgr.best_step() == 7
        state = mgr.restore("latest")
    assert torch.equal(state["w"], torch.arange(3.0)) and state["note"] == "old"


def test_newer_format_version_is_refused_clearly(tmp_path):
    _three_checkpoints(tmp_path)
    manifest = tmp_path / "step_3" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["format_version"] = 99
    manifest.write_text(json.dumps(doc))
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CorruptCheckpointError, match="format version 99 is newer.*upgrade ckpt_plugins"):
            mgr.restore(3)


@pytest.mark.parametrize(
    "files",
    [
        {"../escape": {"size": 1, "xxh3_64": "0"}},
        {"/etc/passwd": {"size": 1, "xxh3_64": "0"}},
        {"a": {"size": 10**20, "xxh3_64": "0"}},
        {"a": {"size": "1", "xxh3_64": "0"}},
    ],
)
def test_hostile_manifest_file_entries(tmp_path, files):
    _three_checkpoints(tmp_path)
    manifest = tmp_path / "step_3" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["files"] = files
    manifest.write_text(json.dumps(doc))
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CorruptCheckpointError, match="manifest.json"):
            mgr.restore(3)


def test_unstorable_object_fails_at_save_time_with_key_path(tmp_path):
    from ckpt_plugins import UnsupportedStateError

    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(UnsupportedStateError, match="fn"):
            mgr.save(1, {"sched": {"fn": lambda x: x}})
        assert mgr.steps() == []
    assert [n for n in os.listdir(tmp_path) if n != ".lock"] == []


def test_dir_prefix_and_extra_files_commit_together(tmp_path):
    written = []

    def writer(f):
        written.append(True)
        f.write(b"native bytes")

    with CheckpointManager(tmp_path, dir_prefix="checkpoint-", keep_last=1) as mgr:
        mgr.save(9, {"a": 1}, extra_files={"trainer_state.json": b'{"global_step": 9}'})
        mgr.save(10, {"a": 2}, extra_files={"optimizer.pt": writer})
        assert mgr.steps() == [10]
        with pytest.raises(ConfigError, match="extra_files name '../x'"):
            mgr.save(11, {"a": 3}, extra_files={"../x": b""})
        assert mgr.steps() == [10]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10"]
    assert (tmp_path / "checkpoint-10" / "optimizer.pt").read_bytes() == b"native bytes" and written
    from ckpt_plugins.cli import main as cli

    assert cli(["verify", str(tmp_path / "checkpoint-10")]) == 0
    (tmp_path / "checkpoint-10" / "optimizer.pt").write_bytes(b"native bytez")
    assert cli(["verify", str(tmp_path / "checkpoint-10")]) == 1


def test_staged_extra_files_hold_the_values_at_save_time(tmp_path):
    from safetensors.torch import load_file

    from ckpt_plugins.files.extra_files import StagedFile, TensorFile

    weights = {"w": torch.zeros(8)}
    opt_state = {"state": {0: {"exp_avg": torch.zeros(8)}}, "param_groups": [{"lr": 0.1}]}
    gate = __import__("threading").Event()
    with CheckpointManager(tmp_path, async_save=True, dir_prefix="checkpoint-") as mgr:
        original = mgr.storage.open_write
        mgr.storage.open_write = lambda path: (gate.wait(10), original(path))[1]
        mgr.save(
            1,
            {"step": 1},
            extra_files={
                "model.safetensors": TensorFile(weights, metadata={"format": "pt"}),
                "optimizer.pt": StagedFile(opt_state, lambda f, sd: torch.save(sd, f)),
            },
        )
        weights["w"].add_(1.0)  # training goes on while the writer waits
        opt_state["state"][0]["exp_avg"].add_(1.0)
        gate.set()
        mgr.wait()
        assert mgr.verify(1) == []
    folder = tmp_path / "checkpoint-1"
    assert torch.equal(load_file(folder / "model.safetensors")["w"], torch.zeros(8))
    saved_opt = torch.load(folder / "optimizer.pt", weights_only=True)
    assert torch.equal(saved_opt["state"][0]["exp_avg"], torch.zeros(8))
    assert saved_opt["param_groups"] == [{"lr": 0.1}]


def test_a_pickled_extra_file_holds_only_its_own_tensors(tmp_path):
    """torch.save stores whole storages: staged tensors of different files must not share one."""
    from ckpt_plugins.files.extra_files import StagedFile, TensorFile

    big = {"w": torch.randn(256, 1024)}  # 1 MiB
    opt_state = {"state": {0: {"exp_avg": torch.ones(1000)}}, "param_groups": [{"lr": 0.1}]}
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(
            1,
            {"model": big},
            extra_files={
                "model.safetensors": TensorFile(big),
                "optimizer.pt": StagedFile(opt_state, lambda f, sd: torch.save(sd, f)),
            },
        ).wait()
    assert (tmp_path / "step_1" / "optimizer.pt").stat().st_size < 16_000  # 4 KB of tensor data


def test_verify_and_quarantine(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(4)}, extra_files={"native.bin": b"abc"})
        mgr.save(2, {"w": torch.ones(4)}, extra_files={"native.bin": b"abc"})
        (tmp_path / "step_2" / "native.bin").write_bytes(b"abd")
        problems = mgr.verify(2)
        assert len(problems) == 1 and "native.bin: checksum mismatch" in problems[0]
        moved = mgr.quarantine(2, problems[0])
        assert mgr.steps() == [1] and os.path.isdir(moved) and ".damaged-" in moved
    with CheckpointManager(tmp_path) as mgr:  # cleanup leaves quarantined folders alone
        assert os.path.isdir(moved) and mgr.steps() == [1]


def test_restore_foreign_files_through_the_same_pipeline(tmp_path):
    from safetensors.torch import save_file

    net = TinyNet()
    torch.save({"model": net.state_dict(), "epoch": 4}, tmp_path / "plain.pt")
    save_file(net.state_dict(), tmp_path / "weights.safetensors")
    with CheckpointManager(tmp_path / "run") as mgr:
        state = mgr.restore(str(tmp_path / "plain.pt"))
        assert state["epoch"] == 4 and mgr.last_restore_report.format == "torch"
        fresh = TinyNet()
        mgr.restore(tmp_path / "plain.pt", include="model.*", rename={"model.": ""}, target=fresh)
        assert all(
            torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=False)
        )
        only_fc1 = mgr.restore(tmp_path / "weights.safetensors", include="fc1.*")
        assert set(only_fc1) == {"fc1.weight", "fc1.bias"}
        mgr.save(1, {"a": 1})
        assert mgr.restore(mgr.path_for(1)) == {"a": 1}  # our own folder by path
        with pytest.raises(CheckpointNotFoundError, match="nothing.pt"):
            mgr.restore(tmp_path / "nothing.pt")


def test_rename_to_empty_prefix_hoists(tmp_path):
    net = TinyNet()
    lightning_like = {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, lightning_like)
        fresh = TinyNet()
        mgr.restore(1, include="state_dict.*", rename={"state_dict.model.": ""}, target=fresh)
        assert all(
            torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=False)
        )
        with pytest.raises(ConfigError, match="rename 'encoder.' matches nothing.*keys are: state_dict, epoch"):
            mgr.restore(1, rename={"encoder.": ""})


def test_named_checkpoints_are_addressed_by_path(tmp_path):
    name = "epoch=0-step=10.ckpt"
    with CheckpointManager(tmp_path, keep_last=1, async_save=True) as mgr:
        mgr.save(10, {"v": 1}, name=name)
        mgr.save(10, {"v": 2}, name=name)  # same name: replaced atomically, no StepExistsError
        mgr.save(10, {"v": 3})  # the step folder is independent of named ones
        mgr.save(11, {"v": 4})
        mgr.wait()
        assert mgr.steps() == [11]  # retention ignores named checkpoints
        assert mgr.restore(tmp_path / name)["v"] == 2
        handle = mgr.save(12, {"v": 5}, name="last.ckpt")
        mgr.delete("last.ckpt")  # queued after the save it follows
        mgr.delete(name)
        mgr.wait()
        assert handle.done() and not (tmp_path / "last.ckpt").exists() and not (tmp_path / name).exists()
        for bad in ("../x", ".hidden", "a/b", ""):
            with pytest.raises(ConfigError, match="plain folder name"):
                mgr.save(13, {}, name=bad)
    assert sorted(os.listdir(tmp_path)) == ["step_11"]


def test_handle_stats_and_done_callbacks(tmp_path):
    seen = []
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        handle = mgr.save(1, {"w": torch.ones(1000)})
        handle.add_done_callback(lambda h: seen.append(dict(h.stats)))
        mgr.wait()
        handle.add_done_callback(lambda h: seen.append("late"))  # already done: runs at once
    assert seen[0]["bytes"] == 4000 and seen[0]["stall_s"] >= 0 and seen[0]["persist_s"] > 0
    assert seen[1] == "late"


def test_writer_function_files_are_hashed_while_written(tmp_path):
    from ckpt_plugins.files.tensor_file import checksum_file
    from ckpt_plugins.storage import LocalStorage

    with CheckpointManager(tmp_path) as mgr:
        mgr.save(
            1,
            {"a": 1},
            extra_files={
                "opt.pt": lambda f: torch.save({"x": torch.arange(100)}, f),
                "seeky.bin": lambda f: (f.write(b"abcdef"), f.seek(0), f.write(b"X")),
            },
        )
        manifest = mgr.layout.read_manifest(mgr.path_for(1))
    for name in ("opt.pt", "seeky.bin"):
        assert manifest.files[name] == checksum_file(LocalStorage(), str(tmp_path / "step_1" / name))
    assert (tmp_path / "step_1" / "seeky.bin").read_bytes() == b"Xbcdef"


def test_cli_reads_hf_layout(tmp_path, capsys):
    from ckpt_plugins.cli import main as cli

    with CheckpointManager(tmp_path, dir_prefix="checkpoint-") as mgr:
        mgr.save(5, {"a": 1}, metrics={"loss": 1.0})
    assert cli(["ls", str(tmp_path)]) == 0
    assert "loss=1" in capsys.readouterr().out
    assert cli(["verify", str(tmp_path)]) == 0
    assert "checkpoint-5" in capsys.readouterr().out


def test_plain_files_are_deleted_and_cleaned_like_folders(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        (tmp_path / "last.ckpt").write_bytes(b"a plain file")
        mgr.delete("last.ckpt")
        assert not (tmp_path / "last.ckpt").exists()
    (tmp_path / ".trash-old.ckpt-0123456789ab").write_bytes(b"x")
    with CheckpointManager(tmp_path):
        pass
    assert [p.name for p in tmp_path.iterdir()] == []
