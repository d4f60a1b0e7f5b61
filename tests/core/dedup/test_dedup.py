"""``dedup=True``: unchanged tensors stored once, with retention, crashes, damage, export and S3.

Real files, a real S3-protocol server (moto), real SIGKILLed subprocesses; nothing mocked.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.cli import main as cli_main
from ckpt_plugins.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from conftest import HELPERS

CHILD = HELPERS / "dedup_forever.py"
KILLS = int(os.environ.get("CKPT_KILLS", 100 if os.environ.get("CKPT_SOAK") else 2))  # alternating saves/deletes


def _model_state(step: int, frozen: torch.Tensor) -> dict:
    return {"model": {"backbone": frozen, "head": torch.full((100, 100), float(step))}, "step": step}


def _shared(directory: Path) -> set[str]:
    pool = directory / ".shared"
    return set(os.listdir(pool)) if pool.exists() else set()


def _referenced(directory: Path) -> set[str]:
    import json

    names: set[str] = set()
    for entry in directory.iterdir():
        manifest = entry / "manifest.json"
        if entry.is_dir() and manifest.exists():
            names |= set(json.loads(manifest.read_bytes()).get("shared_files", {}))
    return names


def test_unchanged_tensors_are_written_once_and_every_kept_checkpoint_restores(tmp_path):
    frozen = torch.randn(800, 1000)  # 80% of the bytes never change
    with CheckpointManager(tmp_path, dedup=True, keep_last=2, keep_every_n_steps=4, async_save=True) as mgr:
        for step in range(1, 10):
            mgr.save(step, _model_state(step, frozen)).wait()
            if step > 1:  # the backbone was neither copied nor hashed: its version counter did not move
                assert mgr.last_save_stats["bytes"] == 100 * 100 * 4
        kept = mgr.steps()
        assert kept == [4, 8, 9]  # retention removed 1-3 and 5-7, whose backbone file 4, 8, 9 read
        for step in kept:
            state = mgr.restore(step)
            assert torch.equal(state["model"]["backbone"], frozen)
            assert torch.equal(state["model"]["head"], torch.full((100, 100), float(step)))
            assert mgr.verify(step) == []
        frozen.mul_(2)  # an in-place change moves the version counter: written again
        mgr.save(10, _model_state(10, frozen)).wait()
        assert mgr.last_save_stats["bytes"] > 800 * 1000 * 4
    assert _shared(tmp_path) == _referenced(tmp_path)  # nothing unreferenced is left
    pool_bytes = sum((tmp_path / ".shared" / n).stat().st_size for n in _shared(tmp_path))
    assert pool_bytes < 2.5 * 800 * 1000 * 4  # two backbones (old and doubled) and small heads, not 10
    with CheckpointManager(tmp_path, dedup=True, keep_last=2, keep_every_n_steps=4) as mgr:  # as a new process
        mgr.save(11, _model_state(11, frozen))
        assert torch.equal(mgr.restore(11)["model"]["backbone"], frozen)
        assert torch.equal(mgr.restore(4)["model"]["backbone"], frozen / 2)
        assert mgr.steps() == [4, 8, 10, 11]
    assert len(_shared(tmp_path)) == len(_referenced(tmp_path))


def test_verify_catches_a_damaged_shared_file_in_every_checkpoint_that_uses_it(tmp_path, capsys):
    frozen = torch.randn(256, 256)
    with CheckpointManager(tmp_path, dedup=True) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _model_state(step, frozen))
    with CheckpointManager(tmp_path) as mgr:
        first = next(n for n in _shared(tmp_path) if n.startswith("1-"))
        path = tmp_path / ".shared" / first
        data = bytearray(path.read_bytes())
        data[-100 * 100 * 4 - 10] ^= 0xFF  # inside the backbone's bytes (step 1's head comes after them)
        path.write_bytes(bytes(data))
        for step in (1, 2, 3):
            problems = mgr.verify(step)
            assert problems and first in problems[0], (step, problems)
            with pytest.raises(CorruptCheckpointError, match=first):
                mgr.restore(step)
        with pytest.raises(CheckpointNotFoundError, match="all 3 candidates are damaged"):
            mgr.restore("latest")  # every checkpoint reads the damaged file: none is usable
        assert mgr.restore(3, include="model.head")["model"]["head"][0, 0] == 3.0  # what is intact still reads
    assert cli_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count(first) >= 3


def test_export_and_convert_write_self_contained_copies(tmp_path, capsys):
    frozen = torch.randn(128, 128)
    run = tmp_path / "run"
    with CheckpointManager(run, dedup=True) as mgr:
        for step in (1, 2):
            mgr.save(step, _model_state(step, frozen))
    assert cli_main(["export", str(run), str(tmp_path / "alone")]) == 0
    assert cli_main(["convert", str(run / "step_2"), str(tmp_path / "w.safetensors"), "--to", "safetensors"]) == 0
    assert cli_main(["inspect", str(run / "step_2")]) == 0  # shapes from the pool files' headers
    assert "model.backbone  (128, 128)  float32" in capsys.readouterr().out
    shutil.rmtree(run)  # the pool is gone: the copies must not need it
    assert sorted(os.listdir(tmp_path / "alone")) == ["manifest.json", "state.safetensors"]
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        state = mgr.restore(tmp_path / "alone")
    assert torch.equal(state["model"]["backbone"], frozen) and state["step"] == 2
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "w.safetensors")["model.backbone"], frozen)
    with pytest.raises(ConfigError, match="exists already"):
        from ckpt_plugins.dedup.export import export_checkpoint

        export_checkpoint(str(tmp_path / "alone"), str(tmp_path / "alone"))


def test_dedup_on_object_storage(s3_bucket, s3_options, tmp_path):
    url = f"s3://{s3_bucket}/run"
    frozen = torch.randn(300, 300)
    with CheckpointManager(url, dedup=True, keep_last=2, storage_options=s3_options) as mgr:
        for step in range(1, 6):
            mgr.save(step, _model_state(step, frozen))
        assert mgr.steps() == [4, 5]
        for step in mgr.steps():
            assert torch.equal(mgr.restore(step)["model"]["backbone"], frozen)
            assert mgr.verify(step) == []
        shared = mgr.storage.listdir(mgr.layout.shared.dir)
        assert len(shared) == 3  # step 1's backbone, steps 4 and 5's heads; 2 and 3's removed
        first = next(n for n in shared if n.startswith("1-"))
    with CheckpointManager(url, storage_options=s3_options) as mgr:  # a new manager: nothing unreferenced
        assert sorted(mgr.storage.listdir(mgr.layout.shared.dir)) == sorted(shared)
    from ckpt_plugins.dedup.export import export_checkpoint

    export_checkpoint(f"{url}/step_5", str(tmp_path / "local_copy"), storage_options=s3_options)
    assert first and sorted(os.listdir(tmp_path / "local_copy")) == ["manifest.json", "state.safetensors"]


def test_sigkill_during_saves_and_retention_deletes_leaves_every_listed_checkpoint_complete(tmp_path):
    """Trials alternate: a SIGKILL at a random moment of a save loop, and one at a random removal
    of a shared file by retention (just before or just after it). After each, every listed
    checkpoint verifies and restores, the newest reported step is there, and once the next
    manager started no shared file is left that no checkpoint refers to."""
    seed = int(os.environ.get("CKPT_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    frozen = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    reported = 0
    for trial in range(KILLS):
        where, mode = ("saves", "deletes")[trial % 2], rng.choice(["sync", "async"])
        argv = [sys.executable, str(CHILD), str(tmp_path), mode]
        if where == "deletes":
            argv += ["--kill-at-removal", str(rng.randint(1, 4))]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        if where == "saves":
            for _ in range(rng.randint(1, 6)):  # events: kill after a random number of commits,
                proc.stdout.readline()
            for _ in range(rng.randint(0, 3000)):  # then a little later (inside the next save)
                pass
            proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == -signal.SIGKILL, (seed, trial, out[-500:])
        lines = [int(x.split()[1]) for x in out.splitlines() if x.startswith("committed")]
        reported = max([reported, *lines])
        with CheckpointManager(tmp_path) as mgr:  # start-up removes what the kill left unreferenced
            steps = mgr.steps()
            if reported:
                assert steps and steps[-1] >= reported, (seed, trial, where, steps, reported)
            for step in steps:
                assert mgr.verify(step) == [], (seed, trial, where, step)
                state = mgr.restore(step)
                assert torch.equal(state["frozen"], frozen) and state["step"] == step, (seed, trial, step)
        assert _shared(tmp_path) == _referenced(tmp_path), (seed, trial, where)
    assert reported > 0, f"seed {seed}: nothing was ever committed"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"dedup": "yes"}, "dedup"), ({"dedup": True, "writer": "process", "async_save": True}, "dedup")],
)
def test_bad_dedup_options_are_config_errors(tmp_path, kwargs, option):
    with pytest.raises(ConfigError) as info:
        CheckpointManager(tmp_path / "d", **kwargs)
    assert info.value.option == option
