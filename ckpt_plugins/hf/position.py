"""Where in the data a checkpoint was taken, and whether a resumed run will pick up there.

The Trainer resumes the data stream itself: from ``global_step`` it computes the epoch and the
number of batches already seen in it, skips them (``skip_first_batches``), and its seedable
sampler draws the same order for the same epoch. That is exact only while the numbers it divides
by are the same as in the interrupted run. So every checkpoint records the data position *and*
the quantities it depends on; on resume :func:`check_resume` compares them with the new run and
names each difference (and ``ignore_data_skip``), because any of them silently changes which
batches the resumed run sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DataPosition", "check_resume"]


@dataclass(frozen=True)
class DataPosition:
    """The data position of one checkpoint (stored in the checkpoint's state, as plain values)."""

    global_step: int
    """Optimizer steps done."""
    epoch: int
    """The epoch the next batch comes from (0-based)."""
    batches_in_epoch: int
    """Batches (micro-batches) of that epoch already trained on."""
    batches_per_epoch: int | None
    """``len(train_dataloader)`` on this rank, or None for an iterable dataset without length."""
    per_device_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    seed: int
    data_seed: int | None

    @classmethod
    def capture(cls, args: Any, state: Any, train_dataloader: Any) -> DataPosition:
        """Read the position from the Trainer's ``TrainingArguments``, ``TrainerState`` and loader."""
        try:
            per_epoch = len(train_dataloader) if train_dataloader is not None else None
        except TypeError:
            per_epoch = None
        accumulation = max(1, int(args.gradient_accumulation_steps))
        if per_epoch:
            updates_per_epoch = max(per_epoch // accumulation + int(per_epoch % accumulation > 0), 1)
            epoch, done = divmod(state.global_step, updates_per_epoch)
            batches = done * accumulation
        else:
            epoch, batches = int(state.epoch or 0), 0
        return cls(
            global_step=int(state.global_step),
            epoch=int(epoch),
            batches_in_epoch=int(batches),
            batches_per_epoch=per_epoch,
            per_device_batch_size=int(args.per_device_train_batch_size),
            gradient_accumulation_steps=accumulation,
            world_size=int(args.world_size),
            seed=int(args.seed),
            data_seed=args.data_seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]  # saved by to_dict


def check_resume(saved: DataPosition, current: DataPosition, ignore_data_skip: bool) -> list[str]:
    """Reasons why the resumed run will not see the batches the interrupted run would have seen.

    Args:
        saved: the position stored in the checkpoint resumed from.
        current: the same quantities captured in the resumed run (at ``on_train_begin``).
        ignore_data_skip: the resumed run's ``TrainingArguments.ignore_data_skip``.

    Returns:
        One sentence per difference; empty when the resume continues the data exactly.
    """
    problems = []
    if ignore_data_skip:
        problems.append(
            "ignore_data_skip=True: the Trainer restarts the epoch instead of skipping "
            f"the {saved.batches_in_epoch} batches already trained on"
        )
    for name in (
        "batches_per_epoch",
        "per_device_batch_size",
        "gradient_accumulation_steps",
        "world_size",
        "seed",
        "data_seed",
    ):
        before, now = getattr(saved, name), getattr(current, name)
        if before != now:
            problems.append(f"{name} was {before} in the interrupted run and is {now} now")
    return problems
