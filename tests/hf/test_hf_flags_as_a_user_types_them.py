"""``--ckpt_*`` flags as a new user types them (issue 13): typos and contradictions are named in
the user's own terms, and ``--ckpt_writer process`` does not make a short run wait for the writer
process. Real ``HfArgumentParser`` and ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_train
from ckpt_plugins import CheckpointManager, ConfigError
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


def build(out: Path, *argv: str, steps: int = 4, eval_set: bool = False) -> Trainer:
    base = [
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--save_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
    ]
    training_args, ckpt_args = HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses(
        [*base, *argv]
    )
    return Trainer(
        model=hf_train.build_model(),
        args=training_args,
        train_dataset=hf_train.TokenDataset(),
        eval_dataset=hf_train.TokenDataset(8, seed=1) if eval_set else None,
        callbacks=[CheckpointCallback.from_args(ckpt_args)],
    )


def test_a_misspelt_monitor_warns_naming_the_logged_metrics(tmp_path, caplog):
    trainer = build(
        tmp_path, "--ckpt_monitor", "eval_los", "--eval_strategy", "steps", "--eval_steps", "4", steps=8, eval_set=True
    )
    caplog.set_level(logging.WARNING, logger="ckpt_plugins")
    trainer.train()
    naming = [r.getMessage() for r in caplog.records if "eval_los'" in r.getMessage()]
    assert len(naming) == 1, [r.getMessage() for r in caplog.records]
    assert "eval_loss" in naming[0] and "--ckpt_monitor" in naming[0]


def test_keep_best_without_a_monitor_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--ckpt_keep_best=1 needs a metric.*--ckpt_monitor.*metric_for_best_model"):
        build(tmp_path, "--ckpt_keep_best", "1")


@pytest.mark.parametrize(
    "argv",
    [
        ["--ckpt_mode", "max", "--greater_is_better", "false"],
        [
            "--ckpt_mode",
            "max",
            "--greater_is_better",
            "false",
            "--ckpt_monitor",
            "eval_loss",
            "--metric_for_best_model",
            "loss",
        ],
        ["--ckpt_mode", "min", "--metric_for_best_model", "accuracy"],
    ],
    ids=["no-metric", "same-metric", "derived"],
)
def test_mode_against_greater_is_better_is_always_caught(tmp_path, argv):
    with pytest.raises(ConfigError, match=r"--ckpt_mode='(max|min)' contradicts greater_is_better=(True|False)"):
        build(tmp_path, *argv)


GATE = """
import os, time
gate = os.environ.get("CKPT_TEST_GATE")
if gate:  # only the spawned writer process inherits this: it waits here, in its start-up
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    open(gate + ".passed", "w").close()
"""


def test_writer_process_start_up_does_not_hold_up_a_short_run(tmp_path, monkeypatch):
    """A writer process that is still starting (held at a gate in its start-up) does not delay the
    saves nor the end of training: they never wait for it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GATE)
    gate = tmp_path / "gate"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CKPT_TEST_GATE", str(gate))

    trainer = build(tmp_path / "out", "--ckpt_writer", "process")
    trainer.train()

    assert not Path(str(gate) + ".passed").exists()  # the run ended while the writer was still starting
    with CheckpointManager(tmp_path / "out", read_only=True, dir_prefix="checkpoint-") as mgr:
        assert mgr.steps() == [4] and mgr.verify(4) == []
