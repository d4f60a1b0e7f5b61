"""transformers' ``--activation_checkpointing``/``--gradient_checkpointing`` flags with our
extensions (mode, every_n, targets), on a model with transformers support (GPT-2) and on a plain
``nn.Module`` without it, trained by a real Trainer."""

from __future__ import annotations

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

import hf_train
from ckpt_plugins.activation import activation_checkpointing_report
from ckpt_plugins.activation.hf import checkpointed_layers
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


def trainer_for(out, model_kind, callback, steps=3, **overrides):
    return hf_train.make_trainer(out, steps, model_kind=model_kind, callback=callback, save_strategy="no", **overrides)


def test_hf_flag_alone_on_a_supported_model_is_left_to_the_trainer(tmp_path):
    trainer = trainer_for(tmp_path, "gpt2", {}, activation_checkpointing=True)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    assert callback.activation_report is None and trainer.args.activation_checkpointing
    trainer.train()
    assert len(checkpointed_layers(trainer.model)) == 2  # transformers' own, on every layer


def test_every_n_extends_the_hf_flag_through_the_models_own_mechanism(tmp_path):
    parser = HfArgumentParser((TrainingArguments, CheckpointArguments))
    args, ckpt = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--gradient_checkpointing", "--ckpt_gradient_checkpointing_every_n", "2"]
    )
    assert ckpt.gradient_checkpointing() == {"mode": "every_n", "every_n": 2}
    trainer = trainer_for(
        tmp_path,
        "gpt2",
        {"gradient_checkpointing": ckpt.gradient_checkpointing()},
        activation_checkpointing=args.activation_checkpointing,
    )
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    report = callback.activation_report
    assert report.mechanism == "hf" and [w.path for w in report.wrapped] == ["transformer.h.0"]
    assert trainer.args.activation_checkpointing is False  # the Trainer must not re-apply its default
    trainer.train()
    assert [type(m).__name__ for m in checkpointed_layers(trainer.model)] == ["GPT2Block"]


def test_hf_flag_on_a_model_without_support(tmp_path):
    without = trainer_for(tmp_path / "plain", "plain", None, gradient_checkpointing=True)
    with pytest.raises((AttributeError, ValueError)):
        without.train()  # what transformers does on its own

    reference = trainer_for(tmp_path / "ref", "plain", None)
    reference.train()
    trainer = trainer_for(tmp_path / "ours", "plain", {}, gradient_checkpointing=True)
    trainer.train()
    report = activation_checkpointing_report(trainer.model)
    assert report.mechanism == "wrap" and [w.path for w in report.wrapped] == ["blocks.0", "blocks.1", "blocks.2"]
    expected, got = hf_train.trainable_state(reference), hf_train.trainable_state(trainer)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # recomputation changes nothing


def test_selective_mode_and_targets_from_flags_on_a_plain_model(tmp_path):
    parser = HfArgumentParser(CheckpointArguments)
    (ckpt,) = parser.parse_args_into_dataclasses(
        ["--ckpt_gradient_checkpointing", "selective", "--ckpt_gradient_checkpointing_targets", "blocks.1,blocks.2"]
    )
    trainer = trainer_for(tmp_path, "plain", {"gradient_checkpointing": ckpt.gradient_checkpointing()})
    trainer.train()
    report = activation_checkpointing_report(trainer.model)
    assert report.mode == "selective" and [w.path for w in report.wrapped] == ["blocks.1", "blocks.2"]
