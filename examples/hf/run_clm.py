"""Causal language modelling with the HF Trainer and ckpt_plugins, in the style of ``run_clm.py``.

Everything is built locally, nothing is downloaded: a character-level tokenizer trained on the
corpus in-process (``tokenizers`` WordLevel, wrapped in ``PreTrainedTokenizerFast``), a tiny
GPT-2 built from a config, and the text shipped in ``examples/data/tiny_corpus.txt``. Checkpoints
are written by :class:`ckpt_plugins.hf.CheckpointCallback` (asynchronous, crash-safe, in the
Trainer's own ``checkpoint-N`` layout), configured by the ``--ckpt_*`` flags; the script resumes
from the newest usable checkpoint in ``--output_dir`` when there is one (``--resume_from_checkpoint
PATH`` picks one, ``--resume_from_checkpoint True`` the newest usable one, damaged ones skipped).

    python examples/hf/run_clm.py --output_dir runs/clm --max_steps 60 --save_steps 10 \\
        --eval_strategy steps --eval_steps 10 --metric_for_best_model loss \\
        --ckpt_keep_last 2 --gradient_checkpointing --ckpt_gradient_checkpointing_every_n 2

``--die_at_step N`` makes the process SIGKILL itself after step N (a save may still be in
flight), the way a preempted job dies; run the same command again to resume.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback, last_usable_checkpoint

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny_corpus.txt"
log = logging.getLogger("run_clm")


@dataclass
class ModelDataArguments:
    corpus: str = field(default=str(CORPUS), metadata={"help": "A UTF-8 text file to train on."})
    block_size: int = field(default=32, metadata={"help": "Tokens (characters) per training example."})
    n_layer: int = field(default=2)
    n_embd: int = field(default=64)
    n_head: int = field(default=2)
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of the blocks kept for evaluation."})
    die_at_step: int | None = field(default=None, metadata={"help": "SIGKILL this process after that step."})
    final_weights: str | None = field(default=None, metadata={"help": "Write the final weights here."})
    stats: str | None = field(default=None, metadata={"help": "Write the per-save stalls here (JSON)."})


def build_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary is the characters of ``text`` (no download)."""
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    for char in sorted(set(text)):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]")


class Blocks(Dataset):
    """Consecutive blocks of ``block_size`` token ids; labels are the inputs (the model shifts)."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        usable = len(ids) // block_size * block_size
        self.blocks = ids[:usable].view(-1, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class DieAtStep(TrainerCallback):
    """SIGKILL the process when step ``step`` has ended (after its log, evaluation and save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            log.warning("SIGKILL at step %d (as a crash or preemption would)", state.global_step)
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelDataArguments, TrainingArguments, CheckpointArguments))
    data_args, training_args, ckpt_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)

    text = Path(data_args.corpus).read_text(encoding="utf-8")
    tokenizer = build_tokenizer(text)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    blocks = Blocks(ids, data_args.block_size)
    n_eval = max(1, int(len(blocks) * data_args.eval_fraction))
    train_set = torch.utils.data.Subset(blocks, range(len(blocks) - n_eval))
    eval_set = torch.utils.data.Subset(blocks, range(len(blocks) - n_eval, len(blocks)))

    torch.manual_seed(training_args.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=data_args.block_size,
        n_embd=data_args.n_embd,
        n_layer=data_args.n_layer,
        n_head=data_args.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)

    checkpointing = CheckpointCallback.from_args(ckpt_args)
    callbacks = [checkpointing] + ([DieAtStep(data_args.die_at_step)] if data_args.die_at_step else [])
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )

    # "--resume_from_checkpoint True" was resolved by the callback when the Trainer was built.
    resume = training_args.resume_from_checkpoint or last_usable_checkpoint(training_args.output_dir)
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)

    if data_args.final_weights:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"},
            data_args.final_weights,
        )
    if data_args.stats:
        Path(data_args.stats).write_text(
            json.dumps(
                {"stall_s": [s.stall_s for s in checkpointing.saves], "steps": [s.step for s in checkpointing.saves]}
            )
        )


if __name__ == "__main__":
    main()
