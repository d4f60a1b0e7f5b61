"""Native resume with a real ``transformers.Trainer``: the Trainer resumes from our folders itself.

Every test trains the tiny GPT-2 of ``helpers/hf_train.py`` on CPU, interrupts it, resumes, and
compares the final weights bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import hf_train
from ckpt_plugins import CheckpointManager
from ckpt_plugins.hf import CheckpointCallback, last_usable_checkpoint

STEPS = 12
one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)
NATIVE_FILES = {
    "config.json",
    "generation_config.json",
    "manifest.json",
    "model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}


class StopAt(TrainerCallback):
    """End training after ``step`` (an interruption that leaves no final save behind)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of uninterrupted runs, per model kind (computed once)."""
    cache = {}

    def get(kind: str = "gpt2") -> dict[str, torch.Tensor]:
        if kind not in cache:
            trainer = hf_train.make_trainer(
                tmp_path_factory.mktemp(f"ref-{kind}"), STEPS, model_kind=kind, save_strategy="no"
            )
            trainer.train()
            cache[kind] = hf_train.trainable_state(trainer)
        return cache[kind]

    return get


def assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize(
    "options", [{}, {"snapshot": "overlap"}, {"async_save": False}], ids=["async", "overlap", "sync"]
)
def test_plain_trainer_resumes_natively_from_our_checkpoints(tmp_path, reference, options):
    interrupted = hf_train.make_trainer(tmp_path, STEPS, callback=options, extra_callbacks=[StopAt(7)])
    interrupted.train()
    callback = next(c for c in interrupted.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    assert [s.step for s in callback.saves] == [4] and callback.saves[0].stall_s > 0

    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    assert set(os.listdir(tmp_path / "checkpoint-4")) == NATIVE_FILES
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"]] == [1, 2, 3, 4]

    resumed = hf_train.make_trainer(tmp_path, STEPS)  # no callback: the Trainer alone
    resumed.train(resume_from_checkpoint=True)
    assert_same(reference(), hf_train.trainable_state(resumed))


def test_gradient_accumulation_resume_is_exact(tmp_path):
    kwargs = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    reference = hf_train.make_trainer(tmp_path / "ref", 8, save_strategy="no", **kwargs)
    reference.train()
    hf_train.make_trainer(tmp_path, 8, callback={}, extra_callbacks=[StopAt(6)], **kwargs).train()
    resumed = hf_train.make_trainer(tmp_path, 8, callback={}, **kwargs)
    resumed.train(resume_from_checkpoint=True)
    assert_same(hf_train.trainable_state(reference), hf_train.trainable_state(resumed))


def test_resume_from_explicit_path_with_callback_continues_saving(tmp_path, reference):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)]).train()
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-8")

    resumed = hf_train.make_trainer(tmp_path, STEPS, callback={"keep_last": 2})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert_same(reference(), hf_train.trainable_state(resumed))
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        assert mgr.steps() == [8, 12]
        assert mgr.verify(12) == []


def test_lora_adapter_and_optimizer_state_save_and_resume(tmp_path, reference):
    hf_train.make_trainer(tmp_path, STEPS, model_kind="lora", callback={}, extra_callbacks=[StopAt(6)]).train()
    folder = tmp_path / "checkpoint-4"
    files = set(os.listdir(folder))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    from safetensors.torch import load_file

    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter)  # Adam moments for exactly the adapter weights

    resumed = hf_train.make_trainer(tmp_path, STEPS, model_kind="lora", callback={})
    resumed.train(resume_from_checkpoint=True)
    assert_same(reference("lora"), hf_train.trainable_state(resumed))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_latest_is_reported_not_moved_and_last_usable_checkpoint_skips_it(tmp_path, reference, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)]).train()
    _flip_byte(tmp_path / "checkpoint-8" / "optimizer.pt")

    caplog.set_level(logging.WARNING, logger="ckpt_plugins")
    resumed = hf_train.make_trainer(tmp_path, STEPS, callback={})
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("checkpoint-8" in w and "optimizer.pt: checksum mismatch" in w for w in warnings), warnings
    assert any("last_usable_checkpoint" in w and "checkpoint-4" in w for w in warnings), warnings
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-8")  # nothing was moved
    assert last_usable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")

    resumed.train(resume_from_checkpoint=last_usable_checkpoint(tmp_path))
    assert_same(reference(), hf_train.trainable_state(resumed))
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        assert mgr.steps() == [4, 8, 12] and mgr.verify(8) == []  # the damaged 8 was replaced at commit


def test_half_written_foreign_checkpoint_is_reported_and_skipped(tmp_path, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(5)]).train()
    torn = tmp_path / "checkpoint-8"  # what a Trainer killed in its own save leaves behind
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x10\x00\x00\x00")

    caplog.set_level(logging.WARNING, logger="ckpt_plugins")
    hf_train.make_trainer(tmp_path, STEPS, callback={})
    assert any("trainer_state.json is missing" in r.getMessage() for r in caplog.records)
    assert torn.is_dir() and last_usable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_save_only_model_writes_weights_and_state_only(tmp_path):
    hf_train.make_trainer(tmp_path, 4, callback={}, save_only_model=True).train()
    assert set(os.listdir(tmp_path / "checkpoint-4")) == NATIVE_FILES - {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    }
