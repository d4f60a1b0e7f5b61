"""Hugging Face Trainer integration: crash-safe, asynchronous checkpoints in the Trainer's layout.

::

    from transformers import HfArgumentParser, Trainer, TrainingArguments
    from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback

    training_args, ckpt_args = HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses()
    trainer = Trainer(model=model, args=training_args, train_dataset=ds,
                      callbacks=[CheckpointCallback.from_args(ckpt_args)])
    trainer.train(resume_from_checkpoint=True)   # native resume, also after a SIGKILL

Modules: :mod:`.callback` (the TrainerCallback), :mod:`.arguments` (``--ckpt_*`` flags),
:mod:`.options` (options meet ``TrainingArguments``), :mod:`.native` (the Trainer's file set),
:mod:`.rng` and :mod:`.position` (exact resume), :mod:`.resume` (which checkpoint to resume from,
``--resume_from_checkpoint True``),
:mod:`.gradient_checkpointing` (activation-checkpointing flags). Importing this package imports
transformers; ``import ckpt_plugins`` does not.
"""

from ckpt_plugins.hf.arguments import CheckpointArguments
from ckpt_plugins.hf.callback import CheckpointCallback, SaveRecord
from ckpt_plugins.hf.guard import GuardFinding, guard_latest  # deprecated
from ckpt_plugins.hf.resume import last_usable_checkpoint

__all__ = [
    "CheckpointArguments",
    "CheckpointCallback",
    "GuardFinding",
    "SaveRecord",
    "guard_latest",
    "last_usable_checkpoint",
]
