"""A tiny, deterministic ``transformers.Trainer`` run, used in-process by the HF tests and as a
script (SIGKILLed subprocesses, ``torchrun``).

    python tests/helpers/hf_train.py OUT --steps 16 --save-steps 4 [--kill-at 7] [--resume]
        [--final weights.safetensors] [--no-callback] [--sync] [--lora] [--reference REF_OUT]

``--kill-at S`` SIGKILLs the process when step S ends; when a save was just submitted at S it is
still being written (asynchronously) at that moment. ``--reference REF_OUT`` first runs the same
training without checkpoints (and without any kill) into REF_OUT and writes its final weights as
``REF_OUT/final.safetensors`` (used by torchrun tests: one launch for two runs).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ckpt_plugins.hf import CheckpointCallback

VOCAB, LENGTH = 64, 16


def single_thread():
    """Pytest fixture body (autouse it in test modules): one torch thread, restored afterwards.

    A 2-core machine shared with other jobs makes OpenMP threads spin against each other; one
    thread is also what the subprocesses use, so in-process and subprocess runs compute alike.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TokenDataset(Dataset):
    """Random token sequences, the same on every call (labels = inputs: causal LM)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PlainLM(nn.Module):
    """A model with no transformers support at all (no PreTrainedModel, no checkpointing hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 32)) for _ in range(3)
        )
        self.head = nn.Linear(32, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.emb(input_ids)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return out


def build_model(kind: str = "gpt2") -> nn.Module:
    """``"gpt2"`` (2 layers, dropout on), ``"lora"`` (the same with a LoRA adapter), ``"plain"``."""
    torch.manual_seed(0)
    if kind == "plain":
        return PlainLM()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2))
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.1, task_type="CAUSAL_LM")
        )
    return model


def training_args(out: str | os.PathLike, steps: int, **overrides) -> TrainingArguments:
    defaults = dict(
        max_steps=steps,
        save_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=1,
        data_seed=2,
        logging_steps=1,
    )
    defaults.update(overrides)
    return TrainingArguments(str(out), **defaults)


class KillAt(TrainerCallback):
    """SIGKILL this process when step ``step`` has ended (at the next step's start, after the
    step's log and save). If no checkpoint has been committed yet (a slow disk), the kill waits
    for the first one, so that the resumed run has something to resume from."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.armed = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            self.armed = True

    def on_step_begin(self, args, state, control, **kwargs):
        if self.armed and any(n.startswith("checkpoint-") for n in os.listdir(args.output_dir)):
            os.kill(os.getpid(), signal.SIGKILL)


class AwaitSignal(TrainerCallback):
    """When step ``at`` has ended: print ``READY <at>`` and wait (up to 120 s) until this process
    has received a preemption signal, so the signal lands inside the next step on every rank."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != self.at:
            return
        import time

        from ckpt_plugins.persist.preemption import pending_signal

        print(f"READY {self.at}", flush=True)
        deadline = time.monotonic() + 120
        while not pending_signal() and time.monotonic() < deadline:
            time.sleep(0.01)


def make_trainer(
    out: str | os.PathLike,
    steps: int,
    *,
    model_kind: str = "gpt2",
    callback: dict | None = None,
    extra_callbacks: list | None = None,
    eval_dataset: Dataset | None = None,
    compute_metrics=None,
    train_size: int = 48,
    **overrides,
) -> Trainer:
    """A Trainer on :class:`TokenDataset`; ``callback`` holds CheckpointCallback kwargs (None: none)."""
    callbacks = [CheckpointCallback(**callback)] if callback is not None else []
    return Trainer(
        model=build_model(model_kind),
        args=training_args(out, steps, **overrides),
        train_dataset=TokenDataset(train_size),
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        callbacks=callbacks + list(extra_callbacks or []),
    )


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The weights training changes: all of them, or only the adapter's for a LoRA model."""
    state = trainer.model.state_dict()
    lora = any("lora_" in k for k in state)
    return {k: v.detach().clone() for k, v in state.items() if not lora or "lora_" in k}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--final")
    parser.add_argument("--no-callback", action="store_true")
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--reference")
    parser.add_argument("--await-signal-at", type=int, help="wait after this step until a preemption signal came")
    parser.add_argument("--sync-every", type=int, default=10, help="preemption_sync_every")
    parser.add_argument("--memory", type=int, help="memory_every_n_steps (the in-memory tier)")
    parser.add_argument("--persist", type=int, help="persist_every_n_steps, with --memory")
    parser.add_argument("--ckpt-dir", help="the callback's dirpath (an s3:// URL: the endpoint from AWS_ENDPOINT_URL)")
    parser.add_argument("--mirror", help="the callback's mirror (the local-first tier of --ckpt-dir)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("CKPT_HF_THREADS", "1")))
    from safetensors.torch import save_file

    if opts.reference:
        ref = make_trainer(opts.reference, opts.steps, model_kind=opts.model, save_strategy="no")
        ref.train()
        if ref.args.process_index == 0:
            save_file(trainable_state(ref), os.path.join(opts.reference, "final.safetensors"))
    extra = [KillAt(opts.kill_at)] if opts.kill_at else []
    if opts.await_signal_at is not None:
        extra.append(AwaitSignal(opts.await_signal_at))
    callback = None if opts.no_callback else {"async_save": not opts.sync, "preemption_sync_every": opts.sync_every}
    if callback is not None and opts.memory:
        callback.update(memory_every_n_steps=opts.memory, persist_every_n_steps=opts.persist)
    if callback is not None and opts.ckpt_dir:
        callback.update(dirpath=opts.ckpt_dir, mirror=opts.mirror, keep_last=2)
    trainer = make_trainer(
        opts.out,
        opts.steps,
        model_kind=opts.model,
        callback=callback,
        extra_callbacks=extra,
        save_steps=opts.save_steps,
    )
    trainer.train(resume_from_checkpoint=True if opts.resume else None)
    if opts.final and trainer.args.process_index == 0:
        save_file(trainable_state(trainer), opts.final)
    if trainer.args.process_index == 0 and callback is not None:
        ckpt = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
        print(f"PREEMPTED_AT {ckpt.preempted_at} STEP {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
