"""Where the training data stands, so a resumed run sees the same batches in the same order.

Lightning itself restores a ``StatefulDataLoader`` (torchdata) mid-epoch: its ``state_dict`` is
part of the loop state in every checkpoint. For a plain ``DataLoader`` it restarts the epoch's
iterator from the beginning, so a mid-epoch resume would see different batches. This module fills
that gap for the common case, a map-style dataset with a ``BatchSampler`` over a
``RandomSampler``, ``SequentialSampler`` or ``DistributedSampler`` (what ``DataLoader(shuffle=...)``
and Lightning's DDP set-up build):

* The order of an epoch is a function of the sampler's generator state when the epoch's iterator
  starts. An unseeded ``RandomSampler`` draws a seed from torch's global generator at that moment,
  which a resumed process cannot replay, so it gets its own ``torch.Generator`` seeded from
  ``torch.initial_seed()`` (logged once). ``DistributedSampler`` orders by ``(seed, epoch)`` and
  needs nothing.
* The sampler under each training ``BatchSampler`` is wrapped (:class:`_Tracked`): when a pass
  over the data starts, it records the generator's state, which decides that pass's order. A
  checkpoint stores it with the number of batches already drawn this epoch.
* On resume, before the first batch is drawn, the generators get the recorded state back and the
  wrapper skips the indices of the batches already trained on in its first pass (no data is
  loaded for them). Draws the uninterrupted run made between the checkpoint and its next batch
  (starting the next epoch's iterator, after a checkpoint that ended an epoch) are made again.

Exact for ``num_workers=0`` or workers without randomness; otherwise, and for iterable datasets or
custom batch samplers, use ``StatefulDataLoader`` (a warning says so once).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

__all__ = ["DataPosition", "train_loaders"]

log = logging.getLogger(__name__)


def train_loaders(trainer: Any) -> list[Any]:
    """The training data loaders of ``trainer``, flattened (dicts/lists of loaders are allowed)."""
    found: list[Any] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)
        elif obj is not None:
            found.append(obj)

    visit(trainer.train_dataloader)
    return found


def _is_stateful(loader: Any) -> bool:
    """A loader Lightning saves and restores itself (the same test as Lightning's ``_Stateful``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _tracked(loader: Any) -> "_Tracked | None":
    """The tracking wrapper of a plain training DataLoader's sampler (installed on first use)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(loader, DataLoader) or _is_stateful(loader) or not isinstance(batch_sampler, BatchSampler):
        return None
    if not isinstance(batch_sampler.sampler, _Tracked):
        sampler = batch_sampler.sampler
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator().manual_seed(torch.initial_seed())
            log.info("gave the train DataLoader's RandomSampler its own generator (seed %d, from "
                     "torch.initial_seed()) so that its order can be replayed on resume", torch.initial_seed())
        batch_sampler.sampler = _Tracked(sampler)
    return batch_sampler.sampler


class _Tracked(Sampler):
    """Wraps a training sampler: records its generator's state when a pass starts (that state
    decides the pass's order) and, once, leaves out the first ``skip`` indices of a pass."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.skip = 0
        self.pass_start: torch.Tensor | None = _generator_state(inner)

    def __iter__(self) -> Iterator[Any]:
        self.pass_start = _generator_state(self.inner)
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


def _generator_state(sampler: Any) -> torch.Tensor | None:
    generator = getattr(sampler, "generator", None)
    return generator.get_state() if isinstance(generator, torch.Generator) else None


class DataPosition:
    """Records and restores the position of the training data (see the module docstring)."""

    def __init__(self) -> None:
        self._warned = False
        self._epoch_ended = False

    def track(self, trainer: Any) -> None:
        """Wrap the training loaders' samplers (at train start and when loaders are reloaded),
        before any pass over them starts."""
        for loader in train_loaders(trainer):
            _tracked(loader)

    def state(self, trainer: Any) -> dict[str, Any]:
        """The position now: epoch, batches drawn this epoch, generator states at the start of
        this epoch's pass and now (per loader; None for loaders Lightning restores itself)."""
        loaders = train_loaders(trainer)
        self._warn_if_inexact(loaders)
        tracked = [_tracked(loader) for loader in loaders]
        return {
            "epoch": int(trainer.current_epoch),
            "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
            "epoch_start": [t.pass_start if t is not None else None for t in tracked],
            "now": [_generator_state(t.inner) if t is not None else None for t in tracked],
        }

    def resume(self, trainer: Any, state: Mapping[str, Any]) -> None:
        """Before the first batch of a resumed run: replay the epoch's order and skip what was seen.

        Args:
            trainer: the trainer, after its train loaders were set up (``on_train_start``).
            state: what :meth:`state` returned when the checkpoint was taken.
        """
        loaders = train_loaders(trainer)
        num_batches = trainer.num_training_batches
        mid_epoch = 0 < state["batches"] < num_batches
        self._epoch_ended = state["batches"] >= num_batches
        generators = state["epoch_start"] if mid_epoch else state["now"]
        if len(generators) != len(loaders):
            log.warning("the checkpoint recorded %d training loader(s), this run has %d; the data "
                        "position is not restored", len(generators), len(loaders))
            return
        for loader, saved in zip(loaders, generators):
            tracked = _tracked(loader)
            if tracked is None:
                continue  # Lightning restores a stateful loader from the loop state
            generator = getattr(tracked.inner, "generator", None)
            if saved is not None and isinstance(generator, torch.Generator):
                generator.set_state(saved)
            if mid_epoch:
                tracked.skip = state["batches"] * loader.batch_sampler.batch_size
            elif self._epoch_ended and loader.generator is not None:
                _draw_base_seed(loader)  # the next epoch's iterator drew it before its pass began
        if mid_epoch:
            log.info("resuming epoch %d at batch %d: the first %d batch(es) of the epoch's order are skipped",
                     state["epoch"], state["batches"], state["batches"])

    def replay_draws_after_save(self, trainer: Any) -> None:
        """Make the global-RNG draws the uninterrupted run made between the checkpoint and its
        next batch; call right after restoring the checkpoint's RNG state.

        After a checkpoint that ended an epoch, that run started the next epoch's iterator, and
        starting a ``DataLoader`` iterator draws its workers' base seed: one int64 from the
        loader's ``generator`` (done in :meth:`resume`), or from the global generator when it has
        none (done here). Mid-epoch there is nothing in between: a save due right before a
        validation is taken after it.
        """
        if not self._epoch_ended:
            return
        self._epoch_ended = False
        for loader in train_loaders(trainer):
            if isinstance(loader, DataLoader) and loader.generator is None:
                _draw_base_seed(loader)

    def _warn_if_inexact(self, loaders: list[Any]) -> None:
        if self._warned:
            return
        for loader in loaders:
            if _is_stateful(loader):
                continue
            reason = None
            if _tracked(loader) is None:
                reason = "it has no BatchSampler (an iterable dataset or a custom batch_sampler)"
            elif getattr(loader, "num_workers", 0) > 0:
                reason = "it uses worker processes, whose random state is not recorded"
            if reason:
                self._warned = True
                log.warning("a mid-epoch resume of the training DataLoader %r may not be exact: %s. "
                            "Use torchdata's StatefulDataLoader (Lightning saves its position) for "
                            "an exact resume.", type(loader).__name__, reason)
                return


def _draw_base_seed(loader: DataLoader) -> None:
    """The draw ``torch.utils.data`` makes when a DataLoader iterator starts (its base seed)."""
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
