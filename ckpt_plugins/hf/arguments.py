"""``CheckpointArguments``: the callback's options as command-line flags for ``HfArgumentParser``.

Every flag is ``--ckpt_`` followed by the callback option of the same name, so a script parses
them next to ``TrainingArguments`` and builds the callback in one line::

    parser = HfArgumentParser((TrainingArguments, CheckpointArguments))
    training_args, ckpt_args = parser.parse_args_into_dataclasses()
    trainer = Trainer(..., args=training_args, callbacks=[CheckpointCallback.from_args(ckpt_args)])
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    python train.py --output_dir out --resume_from_checkpoint True   # resume from the newest usable one
    python train.py --output_dir out --save_steps 50 --ckpt_keep_last 3 --ckpt_async_save true \\
        --gradient_checkpointing --ckpt_gradient_checkpointing_every_n 2
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ckpt_plugins.errors import ConfigError, renamed_options
from ckpt_plugins.hf.options import CallbackOptions

__all__ = ["CheckpointArguments"]

ActivationMode = Literal["full", "every_n", "selective", "offload", "off"]


@dataclass
class CheckpointArguments:
    """Flags of :class:`~ckpt_plugins.hf.CheckpointCallback` (``--ckpt_<option>``).

    Values are checked when the dataclass is built (so a bad flag fails at parse time) and are
    never rewritten; :meth:`to_options` converts them once.
    """

    ckpt_dirpath: str | None = field(
        default=None,
        metadata={"help": "Checkpoint directory (default: --output_dir, where resume_from_checkpoint=True looks)."},
    )
    ckpt_keep_last: int | None = field(
        default=None,
        metadata={"help": "Keep the N most recent checkpoints (default: --save_total_limit; none: keep all)."},
    )
    ckpt_keep_best: int | None = field(
        default=None, metadata={"help": "Keep the N best checkpoints by --ckpt_monitor (the best one is always kept)."}
    )
    ckpt_monitor: str | None = field(
        default=None,
        metadata={"help": "Metric that ranks checkpoints, e.g. eval_loss (default: --metric_for_best_model)."},
    )
    ckpt_mode: Literal["min", "max"] | None = field(
        default=None,
        metadata={
            "help": "Whether lower (min) or higher (max) --ckpt_monitor is better (default: --greater_is_better)."
        },
    )
    ckpt_keep_every_n_steps: int | None = field(
        default=None, metadata={"help": "Also keep, for good, every checkpoint whose step is a multiple of N."}
    )
    ckpt_keep_time_interval: float | None = field(
        default=None,
        metadata={"help": "Also keep, for good, the first checkpoint of every interval of this many seconds."},
    )
    ckpt_overwrite: bool = field(
        default=False,
        metadata={"help": "Let a fresh run save into a directory with checkpoints (replaced as its saves commit)."},
    )
    ckpt_async_save: bool = field(
        default=True,
        metadata={"help": "Write checkpoints in the background; training only waits for a copy of the state."},
    )
    ckpt_max_pending: int = field(
        default=1, metadata={"help": "At most this many checkpoints being written at once (and copies held in memory)."}
    )
    ckpt_snapshot: Literal["safe", "overlap"] = field(
        default="safe",
        metadata={"help": "safe: copy the state when saving; overlap: copy during the next forward/backward."},
    )
    ckpt_writer: Literal["thread", "process"] = field(
        default="thread",
        metadata={"help": "Who writes the tensor files: a background thread, or a writer process (no GIL contention)."},
    )
    ckpt_every_n_train_steps: int | None = field(
        default=None,
        metadata={
            "help": "Save every N optimizer steps and at the end (default: follow --save_strategy/--save_steps)."
        },
    )
    ckpt_memory_every_n_steps: int | None = field(
        default=None,
        metadata={
            "help": "The in-memory tier: save every N steps as a snapshot in host shared memory that outlives "
            "the process (instead of --ckpt_every_n_train_steps); see docs/memory_tier.md."
        },
    )
    ckpt_persist_every_n_steps: int | None = field(
        default=None,
        metadata={
            "help": "With --ckpt_memory_every_n_steps: the saves of steps divisible by K also go to the "
            "directory (a multiple of it; default: every save)."
        },
    )
    ckpt_on_error: Literal["raise", "warn"] = field(
        default="raise",
        metadata={"help": "A failed background save: raise at the next save (stops training), or warn and go on."},
    )
    ckpt_verify_latest: bool = field(
        default=True,
        metadata={
            "help": "Check the newest checkpoint-N when the Trainer is built; warn if damaged (nothing is moved)."
        },
    )
    ckpt_save_on_preemption: bool = field(
        default=True,
        metadata={
            "help": "On a preemption signal: save at the next step all ranks agree on, wait until durable, stop "
            "training; the process then ends with the signal (docs/preemption.md)."
        },
    )
    ckpt_preemption_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        metadata={"help": "Signals that announce a preemption (names, space separated)."},
    )
    ckpt_preemption_sync_every: int = field(
        default=10, metadata={"help": "Under torch.distributed: exchange the preemption flag every N steps."}
    )
    ckpt_gradient_checkpointing: ActivationMode | None = field(
        default=None,
        metadata={"help": "Activation checkpointing mode, extending --activation_checkpointing (any model)."},
    )
    ckpt_gradient_checkpointing_every_n: int | None = field(
        default=None, metadata={"help": "Checkpoint blocks 0, n, 2n, ... (implies mode every_n when no mode is given)."}
    )
    ckpt_gradient_checkpointing_targets: str | None = field(
        default=None,
        metadata={"help": "Blocks to checkpoint: class names or module-path globs, comma separated (default: auto)."},
    )
    ckpt_mirror: str | None = field(
        default=None,
        metadata={
            "help": "With an s3:// --ckpt_dirpath: a local directory every save commits to first; each "
            "checkpoint is then uploaded in the background, and resuming prefers the local copy (docs/storage.md)."
        },
    )
    ckpt_keep_local: int = field(
        default=1, metadata={"help": "With --ckpt_mirror: keep the newest N uploaded checkpoints locally too."}
    )

    ckpt_storage_options: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "fsspec options of an s3:// (or other URL) --ckpt_dirpath, as a JSON object: endpoint, "
            "credentials (prefer the environment for secrets: AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL)."
        },
    )

    def __post_init__(self) -> None:
        self.to_options()  # fail at parse time, naming the flag

    def gradient_checkpointing(self) -> dict[str, Any] | None:
        """The ``gradient_checkpointing`` option the three ``--ckpt_gradient_checkpointing*`` flags mean."""
        mode = self.ckpt_gradient_checkpointing
        every_n, targets = self.ckpt_gradient_checkpointing_every_n, self.ckpt_gradient_checkpointing_targets
        if mode is None and every_n is None and targets is None:
            return None
        if mode is None:
            mode = "every_n" if every_n is not None else "full"
        value: dict[str, Any] = {"mode": mode}
        if every_n is not None:
            value["every_n"] = every_n
        if targets is not None:
            value["targets"] = targets
        return value

    def to_options(self) -> CallbackOptions:
        """The callback options these flags stand for.

        Raises:
            ConfigError: a value is invalid (the message and ``option`` name the flag).
        """
        names = {f.name[len("ckpt_") :]: f"--{f.name}" for f in fields(self)}
        names["gradient_checkpointing"] = "--ckpt_gradient_checkpointing"
        with renamed_options(names):
            return self._options(names)

    def _options(self, names: dict[str, str]) -> CallbackOptions:
        return CallbackOptions(
            dirpath=self.ckpt_dirpath,
            keep_last=self.ckpt_keep_last,
            keep_best=self.ckpt_keep_best,
            monitor=self.ckpt_monitor,
            mode=self.ckpt_mode,
            keep_every_n_steps=self.ckpt_keep_every_n_steps,
            keep_time_interval=self.ckpt_keep_time_interval,
            overwrite=self.ckpt_overwrite,
            async_save=self.ckpt_async_save,
            max_pending=self.ckpt_max_pending,
            snapshot=self.ckpt_snapshot,
            writer=self.ckpt_writer,
            every_n_train_steps=self.ckpt_every_n_train_steps,
            memory_every_n_steps=self.ckpt_memory_every_n_steps,
            persist_every_n_steps=self.ckpt_persist_every_n_steps,
            verify_latest=self.ckpt_verify_latest,
            on_error=self.ckpt_on_error,
            save_on_preemption=self.ckpt_save_on_preemption,
            preemption_signals=tuple(self.ckpt_preemption_signals),
            preemption_sync_every=self.ckpt_preemption_sync_every,
            gradient_checkpointing=self.gradient_checkpointing(),
            storage_options=_json_object("--ckpt_storage_options", self.ckpt_storage_options),
            mirror=self.ckpt_mirror,
            keep_local=self.ckpt_keep_local,
        ).spelled(names)


def _json_object(flag: str, text: str | None) -> dict[str, Any] | None:
    """A flag's JSON object (the message never shows the value: it may hold a secret)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} must be a JSON object ({exc.msg} at character {exc.pos})", option=flag) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got a JSON {type(value).__name__}", option=flag)
    return value
