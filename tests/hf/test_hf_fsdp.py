"""A real ``transformers.Trainer`` holding an FSDP2 model (``fully_shard``: DTensor parameters and
optimizer state) with CheckpointCallback, in one CPU process (tests/helpers/hf_fsdp_train.py):
the callback saves the sharded state on every rank instead of ``model.safetensors``/``optimizer.pt``,
and ``train(resume_from_checkpoint=...)`` resumes through the loaders ckpt_plugins.hf.fsdp wraps
on the Trainer (the Trainer's own would find no weights). accelerate does not shard on CPU, so the
model is sharded before the Trainer gets it; on GPUs accelerate's FSDP2 produces the same state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import HELPERS

SCRIPT = HELPERS / "hf_fsdp_train.py"


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_trainer_with_an_fsdp2_model_saves_sharded_and_resumes_bit_exact(tmp_path: Path):
    out = _run(str(tmp_path / "run"), "--steps", "4", "--final", str(tmp_path / "ref.safetensors"))
    assert "STEP 4 SHARDED DTensor" in out
    folder = tmp_path / "run" / "checkpoint-2"
    names = {p.name for p in folder.iterdir()}
    assert "shard_0.safetensors" in names and not names & {"model.safetensors", "optimizer.pt"}, names
    assert {"scheduler.pt", "rng_state.pth", "trainer_state.json", "config.json"} <= names
    tensors = json.loads((folder / "manifest.json").read_text())["sharded"]["tensors"]
    assert "model.transformer.h.0.attn.c_attn.weight" in tensors
    assert "optimizer.state.transformer.h.0.attn.c_attn.weight.exp_avg" in tensors  # keyed by name

    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    out = _run(
        str(tmp_path / "run"), "--steps", "4", "--resume", str(folder), "--final", str(tmp_path / "res.safetensors")
    )
    assert "STEP 4 SHARDED DTensor" in out
    ref, resumed = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "res.safetensors")
    assert ref.keys() == resumed.keys()
    assert [k for k in ref if not torch.equal(ref[k], resumed[k])] == []


def test_load_best_model_at_end_reads_the_best_sharded_checkpoint(tmp_path: Path):
    """With evaluation, ``load_best_model_at_end`` loads the best ``checkpoint-N`` (sharded, no
    weights file) through the wrapped ``_load_best_model``: the final weights are that checkpoint's."""
    from ckpt_plugins import CheckpointManager

    out = _run(str(tmp_path / "run"), "--steps", "4", "--best", "--final", str(tmp_path / "final.safetensors"))
    best = out.split("BEST ")[1].split()[0]
    assert Path(best).name == "checkpoint-2", out  # seeded: eval_loss is lowest at step 2, not the last step
    with CheckpointManager(tmp_path / "run", dir_prefix="checkpoint-", read_only=True) as mgr:
        saved = mgr.restore(best, include="model")["model"]
    with CheckpointManager(tmp_path / "run", dir_prefix="checkpoint-", read_only=True) as mgr:
        last = mgr.restore(4, include="model")["model"]
    final = load_file(tmp_path / "final.safetensors")
    assert final.keys() <= saved.keys()
    assert [k for k in final if not torch.equal(final[k], saved[k])] == []
    assert any(not torch.equal(final[k], last[k]) for k in final)  # the last step's weights were replaced
