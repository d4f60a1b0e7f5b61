"""``CheckpointArguments`` (``--ckpt_*`` flags) and how options meet ``TrainingArguments``."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from transformers import HfArgumentParser, TrainingArguments

from ckpt_plugins import ConfigError
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback
from ckpt_plugins.hf.options import CallbackOptions, resolve


def parse(*argv: str) -> tuple[TrainingArguments, CheckpointArguments]:
    return HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses(
        ["--output_dir", "out", "--use_cpu", "--report_to", "none", *argv]
    )


def test_every_flag_is_ckpt_plus_a_callback_option():
    options = {f.name for f in fields(CallbackOptions)}
    flags = {f.name for f in fields(CheckpointArguments)}
    assert all(flag.startswith("ckpt_") for flag in flags)
    assert {f"ckpt_{o}" for o in options} <= flags
    assert flags - {f"ckpt_{o}" for o in options} == {
        "ckpt_gradient_checkpointing_every_n",
        "ckpt_gradient_checkpointing_targets",
    }


def test_flags_build_the_callback():
    _, ckpt = parse(
        "--ckpt_keep_last",
        "3",
        "--ckpt_keep_best",
        "2",
        "--ckpt_monitor",
        "eval_loss",
        "--ckpt_mode",
        "min",
        "--ckpt_async_save",
        "false",
        "--ckpt_every_n_train_steps",
        "50",
        "--ckpt_keep_time_interval",
        "3600",
        "--ckpt_snapshot",
        "safe",
    )
    callback = CheckpointCallback.from_args(ckpt)
    assert callback.options == CallbackOptions(
        keep_last=3,
        keep_best=2,
        monitor="eval_loss",
        mode="min",
        async_save=False,
        every_n_train_steps=50,
        keep_time_interval=3600.0,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ckpt_keep_last", "0"], "keep_last must be a positive integer"),
        (["--ckpt_max_pending", "0"], "max_pending must be a positive integer"),
        (
            ["--ckpt_snapshot", "overlap", "--ckpt_async_save", "false"],
            "--ckpt_snapshot='overlap' needs --ckpt_async_save=True",
        ),
        (["--ckpt_gradient_checkpointing", "every_n", "--ckpt_gradient_checkpointing_every_n", "0"], "every_n=0"),
    ],
)
def test_bad_flags_fail_at_parse_time_naming_the_option(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_invalid_choice_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        parse("--ckpt_mode", "best")


def _args(**kwargs) -> TrainingArguments:
    return TrainingArguments("out", use_cpu=True, report_to=[], **kwargs)


@pytest.mark.parametrize(
    "options, args, expected",
    [
        ({}, {}, dict(dirpath="out", keep_last=None, monitor=None, mode="min", every_n=None, strategy="steps")),
        ({}, dict(save_total_limit=2), dict(keep_last=2)),
        ({"keep_last": 5}, dict(save_total_limit=2), dict(keep_last=5)),
        ({}, dict(metric_for_best_model="accuracy"), dict(monitor="eval_accuracy", mode="max")),
        ({}, dict(metric_for_best_model="loss"), dict(monitor="eval_loss", mode="min")),
        ({"monitor": "loss", "mode": "min"}, dict(metric_for_best_model="accuracy"), dict(monitor="loss", mode="min")),
        (
            {"dirpath": "elsewhere", "every_n_train_steps": 7},
            dict(save_strategy="epoch"),
            dict(dirpath="elsewhere", every_n=7, strategy="epoch"),
        ),
    ],
)
def test_options_resolve_against_training_arguments(options, args, expected):
    settings = resolve(CallbackOptions(**options), _args(**args))
    got = dict(
        dirpath=settings.dirpath,
        keep_last=settings.manager_kwargs["keep_last"],
        monitor=settings.manager_kwargs["monitor"],
        mode=settings.manager_kwargs["mode"],
        every_n=settings.every_n_train_steps,
        strategy=settings.save_strategy,
    )
    assert {k: got[k] for k in expected} == expected
    assert settings.manager_kwargs["dir_prefix"] == "checkpoint-"


def test_contradicting_mode_and_greater_is_better_are_refused():
    with pytest.raises(ConfigError, match="mode='min' contradicts greater_is_better=True"):
        resolve(CallbackOptions(mode="min"), _args(metric_for_best_model="accuracy"))
    with pytest.raises(ConfigError, match="keep_best=2 needs a metric"):
        resolve(CallbackOptions(keep_best=2), _args())


def test_import_ckpt_plugins_does_not_import_transformers():
    code = "import sys, ckpt_plugins, ckpt_plugins.activation; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
