"""The callback as a drop-in for the Trainer's own saving (issue 13): what the Trainer allows keeps
working with the callback appended. Real ``transformers.Trainer`` runs on the tiny GPT-2 of
``helpers/hf_train.py`` (built from a config, nothing downloaded)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

import hf_train
from ckpt_plugins import CheckpointManager, restore_rng
from ckpt_plugins.errors import StepExistsError
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback

STEPS = 12
one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


class StopAt(TrainerCallback):
    """End training after ``step`` (an interruption that leaves no final save behind)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Listing(TrainerCallback):
    """The ``checkpoint-N`` folders present at the end of each step."""

    def __init__(self) -> None:
        self.at: dict[int, list[str]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.at[state.global_step] = checkpoints(args.output_dir)


def checkpoints(folder) -> list[str]:
    return sorted((n for n in os.listdir(folder) if n.startswith("checkpoint")), key=lambda n: (len(n), n))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of an uninterrupted run (one torch thread, as every test here)."""
    threads = hf_train.single_thread()
    next(threads)
    trainer = hf_train.make_trainer(tmp_path_factory.mktemp("ref"), STEPS, save_strategy="no")
    trainer.train()
    next(threads, None)
    return hf_train.trainable_state(trainer)


def assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wall_time(folder: Path) -> float:
    return json.loads((folder / "manifest.json").read_text())["wall_time"]


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ckpt_plugins")
    ]


def test_resume_from_an_older_checkpoint_in_the_same_output_dir(tmp_path, reference, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}).train()
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    before = {n: wall_time(tmp_path / n) for n in checkpoints(tmp_path)}

    caplog.clear()
    listing = Listing()
    resumed = hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[listing])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))  # the Trainer allows this

    assert_same(reference, hf_train.trainable_state(resumed))
    naming = [w for w in warnings_of(caplog) if "[8, 12]" in w]
    assert len(naming) == 1, warnings_of(caplog)
    assert listing.at[7] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]  # nothing removed up front
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert wall_time(tmp_path / "checkpoint-4") == before["checkpoint-4"]
    assert all(wall_time(tmp_path / n) > before[n] for n in ("checkpoint-8", "checkpoint-12"))  # this run's


def test_later_checkpoints_go_only_when_the_resumed_run_commits(tmp_path, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}).train()
    old_8 = wall_time(tmp_path / "checkpoint-8")

    stopped = hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(6)])
    stopped.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))  # interrupted before any save
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert wall_time(tmp_path / "checkpoint-8") == old_8

    stopped = hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)])
    stopped.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    # step 8 of this run committed: it replaced the old 8, and the old 12 (a future this run left) is gone
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-8"]
    assert wall_time(tmp_path / "checkpoint-8") > old_8


def test_a_fresh_run_into_a_directory_with_checkpoints_stops_before_training(tmp_path):
    hf_train.make_trainer(tmp_path, 4, callback={}).train()
    again = hf_train.make_trainer(tmp_path, 4, callback={})
    with pytest.raises(StepExistsError, match=r"steps \[4\].*resume_from_checkpoint=True.*--ckpt_overwrite"):
        again.train()
    assert checkpoints(tmp_path) == ["checkpoint-4"]


def test_training_args_bin_is_written_as_the_trainer_writes_it(tmp_path):
    hf_train.make_trainer(tmp_path, 4, callback={}).train()
    args = torch.load(tmp_path / "checkpoint-4" / "training_args.bin", weights_only=False)  # test data: trusted
    assert isinstance(args, TrainingArguments)
    assert (args.output_dir, args.save_steps, args.max_steps) == (str(tmp_path), 4, 4)
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        assert mgr.verify(4) == []


def _reshard(folder: Path) -> None:
    """What ``save_pretrained(max_shard_size=...)`` leaves: an index and two shards, no model.safetensors."""
    weights = load_file(folder / "model.safetensors")
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
        "weight_map": {k: shard for shard, keys in shards.items() for k in keys},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()


def test_resume_from_a_resharded_checkpoint_only_warns(tmp_path, reference, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)]).train()
    _reshard(tmp_path / "checkpoint-8")

    caplog.clear()
    resumed = hf_train.make_trainer(tmp_path, STEPS, callback={})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))

    assert_same(reference, hf_train.trainable_state(resumed))
    assert any("checkpoint-8" in w and "model.safetensors" in w for w in warnings_of(caplog)), warnings_of(caplog)


def test_building_a_trainer_renames_nothing_and_an_explicit_path_is_loaded_as_given(tmp_path, reference, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)]).train()
    config = tmp_path / "checkpoint-8" / "config.json"
    edited = {**json.loads(config.read_text()), "note": "edited by hand"}
    config.write_text(json.dumps(edited))  # no longer matches the manifest
    before = sorted(os.listdir(tmp_path))

    caplog.clear()
    trainer = hf_train.make_trainer(tmp_path, STEPS, callback={})
    assert sorted(os.listdir(tmp_path)) == before  # nothing renamed at construction
    assert any("checkpoint-8" in w and "config.json" in w for w in warnings_of(caplog)), warnings_of(caplog)

    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert_same(reference, hf_train.trainable_state(trainer))
    assert json.loads(config.read_text()) == edited  # the explicit path was never moved or replaced
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert not [n for n in os.listdir(tmp_path) if ".damaged-" in n]


def _cli(out: Path, *argv: str) -> tuple[TrainingArguments, CheckpointArguments]:
    """The flags of a script that parses ``(TrainingArguments, CheckpointArguments)``."""
    base = [
        "--output_dir",
        str(out),
        "--max_steps",
        str(STEPS),
        "--save_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "1",
        "--data_seed",
        "2",
        "--logging_steps",
        "1",
    ]
    return HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses([*base, *argv])


def _script_run(out: Path, *argv: str) -> Trainer:
    """The common script form: ``trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)``."""
    training_args, ckpt_args = _cli(out, *argv)
    trainer = Trainer(
        model=hf_train.build_model(),
        args=training_args,
        train_dataset=hf_train.TokenDataset(),
        callbacks=[CheckpointCallback.from_args(ckpt_args)],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer


def test_resume_from_checkpoint_true_on_the_command_line(tmp_path, reference):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)]).train()
    trainer = _script_run(tmp_path, "--resume_from_checkpoint", "True")
    assert_same(reference, hf_train.trainable_state(trainer))
    state = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, STEPS + 1))


def test_resume_from_checkpoint_true_on_the_command_line_skips_a_damaged_newest(tmp_path, reference, caplog):
    hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[StopAt(9)]).train()
    optimizer = tmp_path / "checkpoint-8" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))

    caplog.clear()
    trainer = _script_run(tmp_path, "--resume_from_checkpoint", "True")
    assert_same(reference, hf_train.trainable_state(trainer))
    assert any("checkpoint-8" in w and "optimizer.pt" in w for w in warnings_of(caplog)), warnings_of(caplog)
    assert not [n for n in os.listdir(tmp_path) if ".damaged-" in n]
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        assert mgr.steps() == [4, 8, 12] and mgr.verify(8) == []  # the damaged 8 was replaced at commit


def test_rng_state_file_holds_the_trainer_keys_and_the_core_reads_it(tmp_path):
    hf_train.make_trainer(tmp_path, 4, callback={}).train()
    state = torch.load(tmp_path / "checkpoint-4" / "rng_state.pth", weights_only=False)  # test data: trusted
    assert {"python", "numpy", "cpu"} <= set(state)
    torch.manual_seed(123)
    restore_rng(state)  # the core's restore reads the Trainer's key names too
    assert torch.equal(torch.get_rng_state(), state["cpu"])


class RaiseAt(TrainerCallback):
    """Raise out of ``train()`` after ``step`` (an error in the user's code: on_train_end never runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("user error in the training loop")


def test_a_train_that_raised_leaves_nothing_open_for_the_next_trainer(tmp_path, caplog):
    """A notebook: train() raises, the user fixes the bug and builds a new Trainer on the same
    output_dir. The first callback's manager (and the directory lock) must not block the second."""
    with pytest.raises(RuntimeError, match="user error"):
        hf_train.make_trainer(tmp_path, STEPS, callback={}, extra_callbacks=[RaiseAt(5)]).train()
    second = hf_train.make_trainer(tmp_path, STEPS, callback={})
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    with CheckpointManager(tmp_path, dir_prefix="checkpoint-") as mgr:  # nothing holds the lock now
        assert mgr.steps() == [4, 8, 12]
