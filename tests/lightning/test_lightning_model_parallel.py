"""Lightning's ModelParallelStrategy (FSDP2 over 2 CPU processes, gloo) through CheckpointCallback:
each rank saves its own shards, and a run SIGKILLed mid-training resumes bit-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HELPERS
from faults import kill_rng
from lightning_names import path_of, steps_in

SCRIPT = HELPERS / "lightning_train.py"


def _run(args: list[str], returncode: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        start_new_session=True,
    )
    assert proc.returncode == returncode, f"got {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_model_parallel_fsdp2_sigkill_and_resume_is_bit_exact(tmp_path: Path):
    rng, seed = kill_rng("lightning model parallel run")
    die_at = rng.randrange(5, 11)
    common = ["--steps", "12", "--every", "4", "--ddp", "--strategy", "model_parallel"]
    _run(["--dir", str(tmp_path / "ref"), *common, "--out", str(tmp_path / "ref.safetensors")], 0)
    _run(["--dir", str(tmp_path / "run"), *common, "--die-at", str(die_at)], -9)
    committed = steps_in(tmp_path / "run")
    assert committed, f"seed {seed}: nothing committed before the kill at step {die_at}"
    manifest = json.loads((path_of(tmp_path / "run", committed[-1]) / "manifest.json").read_text())
    assert {"shard_0.safetensors", "shard_1.safetensors"} <= manifest["files"].keys()  # each rank its own shards
    assert "state_dict.body.0.weight" in manifest["sharded"]["tensors"]
    _run(["--dir", str(tmp_path / "run"), *common, "--resume", "--out", str(tmp_path / "resumed.safetensors")], 0)
    ref, resumed = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert ref.keys() == resumed.keys()
    different = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not different, f"seed {seed}, killed at step {die_at} with {committed}: {different}"


def test_fsdp_strategy_is_hooked_and_its_full_state_dict_type_is_refused_with_the_fix_named():
    """FSDPStrategy (FSDP1; Lightning runs it on CUDA only) loads checkpoints by itself like
    ModelParallelStrategy: the callback wraps its load_checkpoint for sharded state dicts
    (the round trips of that state run on CPU in tests/sharded/test_fsdp_frameworks.py)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from ckpt_plugins.errors import ConfigError
    from ckpt_plugins.lightning import model_parallel

    assert not model_parallel.needs_install(DDPStrategy())
    sharded = FSDPStrategy(state_dict_type="sharded")
    assert model_parallel.needs_install(sharded)
    original = sharded.load_checkpoint
    model_parallel.install(sharded)
    assert sharded.load_checkpoint is not original and sharded._ckpt_plugins_load == original
    full = FSDPStrategy(state_dict_type="full")
    with pytest.raises(ConfigError, match=r"FSDPStrategy\(state_dict_type='sharded'\)"):
        model_parallel.install(full)
