"""Retention with a real ``transformers.Trainer``: what is kept, and the best checkpoint.

Evaluation metrics come from a scripted ``compute_metrics`` (the i-th evaluation reports
``SCORES[i]``), so which step is best is known in advance: with ``greater_is_better=False`` the
best is step 4, with ``True`` step 6.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import hf_train
from ckpt_plugins import CheckpointManager

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)

SCORES = [3.0, 1.0, 4.0, 2.0]  # evaluations at steps 2, 4, 6, 8


def scripted_metrics():
    calls = iter(SCORES)
    return lambda eval_pred: {"score": next(calls)}


def run(out: Path, steps: int = 8, callback: dict | None = None, evaluate: bool = False, **overrides):
    extra = {}
    if evaluate:
        extra = dict(
            eval_dataset=hf_train.TokenDataset(4, seed=9),
            compute_metrics=scripted_metrics(),
            eval_strategy="steps",
            eval_steps=2,
            metric_for_best_model="score",
        )
    trainer = hf_train.make_trainer(
        out, steps, callback=callback if callback is not None else {}, save_steps=2, **extra, **overrides
    )
    trainer.train()
    return trainer


def checkpoints(out: Path) -> list[int]:
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert all((out / n / "manifest.json").is_file() for n in names), "a checkpoint not written by us"
    return sorted(int(n.split("-")[1]) for n in names)


@pytest.mark.parametrize("greater, best", [(False, 4), (True, 6)])
def test_best_checkpoint_is_kept_and_loaded_at_end(tmp_path, greater, best):
    trainer = run(
        tmp_path, callback={"keep_last": 1}, evaluate=True, greater_is_better=greater, load_best_model_at_end=True
    )
    assert checkpoints(tmp_path) == [best, 8]
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    assert trainer.state.best_metric == SCORES[best // 2 - 1] and trainer.state.best_global_step == best
    saved = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(tmp_path / f"checkpoint-{best}")
    best_weights = load_file(tmp_path / f"checkpoint-{best}" / "model.safetensors")
    model = trainer.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in best_weights.items())  # load_best_model_at_end
    with CheckpointManager(
        tmp_path, read_only=True, dir_prefix="checkpoint-", monitor="eval_score", mode="max" if greater else "min"
    ) as mgr:
        assert "best" in mgr.retention().keep[best]
        assert mgr.records()[0].metrics["eval_score"] == SCORES[best // 2 - 1]


@pytest.mark.parametrize(
    "callback, overrides, expected",
    [
        ({}, {"save_total_limit": 2}, [6, 8]),  # follows save_total_limit
        ({"keep_last": 1, "keep_every_n_steps": 4}, {}, [4, 8]),
        ({"every_n_train_steps": 3}, {}, [3, 6, 8]),  # own interval + last step
        ({}, {"save_strategy": "epoch", "max_steps": -1, "num_train_epochs": 2, "train_size": 16}, [4, 8]),
    ],
    ids=["save_total_limit", "keep_every_n_steps", "every_n_train_steps", "epoch"],
)
def test_schedule_and_retention(tmp_path, callback, overrides, expected):
    run(tmp_path, callback=callback, **overrides)
    assert checkpoints(tmp_path) == expected


def test_save_strategy_best_saves_only_new_bests_and_trainer_saves_nothing(tmp_path):
    run(tmp_path, evaluate=True, save_strategy="best", greater_is_better=False)
    assert checkpoints(tmp_path) == [2, 4]  # scores 3 then 1 improve; 4 and 2 do not


def test_trainers_best_checkpoint_is_kept_when_its_metric_bypasses_on_evaluate(tmp_path):
    """A Trainer whose evaluation never calls ``on_evaluate`` (a custom evaluation loop) still
    records ``best_global_step``; retention keeps that checkpoint as the Trainer's own rotation
    does, so ``best_model_checkpoint`` names a folder that exists."""
    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    evaluated = []

    class CustomEvaluation(Trainer):
        def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
            metrics = {"eval_accuracy": next(scores)}
            evaluated.append(self.state.global_step)
            self.log(metrics)
            return metrics

    trainer = hf_train.make_trainer(
        tmp_path,
        8,
        callback={},
        save_steps=2,
        eval_dataset=hf_train.TokenDataset(4, seed=9),
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        save_total_limit=1,
    )
    trainer.__class__ = CustomEvaluation
    trainer.train()
    assert evaluated[:4] == [2, 4, 6, 8]  # and once more at step 8, at the end of training
    assert trainer.state.best_global_step == 2 and trainer.state.best_metric == 0.9
    # retention kept 2 (protected) and 8 (latest); at the end of training the Trainer itself removes
    # the last checkpoint when save_total_limit=1 and it is not the best one
    assert checkpoints(tmp_path) == [2]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
