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
* At every epoch start the generators' states are recorded; a checkpoint stores them with the
  number of batches already drawn this epoch.
* On resume, before the first batch is drawn, the generators get the recorded epoch-start state
  back and the ``BatchSampler``'s sampler is wrapped so that its first pass skips the indices of
  the batches already trained on (no data is loaded for them). The wrapper unwinds itself at the
  next epoch.

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


def _sampler(loader: Any) -> Sampler | None:
    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(loader, DataLoader) and isinstance(batch_sampler, BatchSampler):
        inner = batch_sampler.sampler
        return inner.inner if isinstance(inner, _SkipFirst) else inner
    return None


def _restart_epoch_iterator(trainer: Any) -> None:
    """Start the epoch's data iterator again, as Lightning does at the start of every later epoch.

    A checkpoint taken at the end of an epoch holds the RNG state from before the next epoch's
    iterator was created, and creating it draws from the global generator (a DataLoader draws
    its workers' base seed). A resumed run created its iterator before the RNG was restored, so
    it is created once more here, after: the draws then happen where the uninterrupted run made
    them. (``_data_fetcher`` is the fit loop's own fetcher; without it nothing is done.)
    """
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is not None:
        iter(fetcher)


class _SkipFirst(Sampler):
    """Yields ``inner``'s indices, leaving out the first ``skip`` of its next pass only."""

    def __init__(self, inner: Sampler, skip: int) -> None:
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class DataPosition:
    """Records and restores the position of the training data (see the module docstring)."""

    def __init__(self) -> None:
        self._epoch_start: list[torch.Tensor | None] = []
        self._warned = False
        self._restart_iterator = False

    # --- every run -----------------------------------------------------------------------------
    def on_epoch_start(self, trainer: Any) -> None:
        """Give unseeded samplers a generator, record the generators' states, drop skip wrappers."""
        loaders = train_loaders(trainer)
        for loader in loaders:
            batch_sampler = getattr(loader, "batch_sampler", None)
            if isinstance(batch_sampler, BatchSampler) and isinstance(batch_sampler.sampler, _SkipFirst):
                batch_sampler.sampler = batch_sampler.sampler.inner
        self._seed_samplers(loaders)
        self._epoch_start = [self._generator_state(loader) for loader in loaders]

    def state(self, trainer: Any) -> dict[str, Any]:
        """The position now: epoch, batches drawn this epoch, epoch-start and current generator states."""
        loaders = train_loaders(trainer)
        self._warn_if_inexact(loaders)
        return {
            "epoch": int(trainer.current_epoch),
            "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
            "epoch_start": list(self._epoch_start),
            "now": [self._generator_state(loader) for loader in loaders],
        }

    # --- a resumed run -------------------------------------------------------------------------
    def resume(self, trainer: Any, state: Mapping[str, Any]) -> None:
        """Before the first batch of a resumed run: replay the epoch's order and skip what was seen.

        Args:
            trainer: the trainer, after its train loaders were set up (``on_train_start``).
            state: what :meth:`state` returned when the checkpoint was taken.
        """
        loaders = train_loaders(trainer)
        self._seed_samplers(loaders)
        num_batches = trainer.num_training_batches
        mid_epoch = 0 < state["batches"] < num_batches
        generators = state["epoch_start"] if mid_epoch else state["now"]
        if len(generators) != len(loaders):
            log.warning("the checkpoint recorded %d training loader(s), this run has %d; the data "
                        "position is not restored", len(generators), len(loaders))
            return
        for loader, saved in zip(loaders, generators):
            if _is_stateful(loader):
                continue  # Lightning restored it from the loop state
            sampler = _sampler(loader)
            generator = getattr(sampler, "generator", None)
            if saved is not None and isinstance(generator, torch.Generator):
                generator.set_state(saved)
            if mid_epoch and sampler is not None:
                loader.batch_sampler.sampler = _SkipFirst(sampler, state["batches"] * loader.batch_sampler.batch_size)
        self._epoch_start = list(state["epoch_start"]) if mid_epoch else [self._generator_state(l) for l in loaders]
        self._restart_iterator = state["batches"] >= num_batches
        if mid_epoch:
            log.info("resuming epoch %d at batch %d: the first %d batch(es) of the epoch's order are skipped",
                     state["epoch"], state["batches"], state["batches"])

    def after_rng_restored(self, trainer: Any) -> None:
        """Right after the RNG was restored: when the checkpoint ended an epoch, create the next
        epoch's iterator now, as the uninterrupted run did after its save (see
        :func:`_restart_epoch_iterator`)."""
        if self._restart_iterator:
            self._restart_iterator = False
            _restart_epoch_iterator(trainer)

    # --- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _seed_samplers(loaders: list[Any]) -> None:
        for loader in loaders:
            sampler = _sampler(loader)
            if isinstance(sampler, RandomSampler) and sampler.generator is None and not _is_stateful(loader):
                sampler.generator = torch.Generator().manual_seed(torch.initial_seed())
                log.info("gave the train DataLoader's RandomSampler its own generator (seed %d, from "
                         "torch.initial_seed()) so that its order can be replayed on resume",
                         torch.initial_seed())

    @staticmethod
    def _generator_state(loader: Any) -> torch.Tensor | None:
        generator = getattr(_sampler(loader), "generator", None)
        return generator.get_state() if isinstance(generator, torch.Generator) else None

    def _warn_if_inexact(self, loaders: list[Any]) -> None:
        if self._warned:
            return
        for loader in loaders:
            if _is_stateful(loader):
                continue
            reason = None
            if _sampler(loader) is None:
                reason = "it has no BatchSampler (an iterable dataset or a custom batch_sampler)"
            elif getattr(loader, "num_workers", 0) > 0:
                reason = "it uses worker processes, whose random state is not recorded"
            if reason:
                self._warned = True
                log.warning("a mid-epoch resume of the training DataLoader %r may not be exact: %s. "
                            "Use torchdata's StatefulDataLoader (Lightning saves its position) for "
                            "an exact resume.", type(loader).__name__, reason)
                return
