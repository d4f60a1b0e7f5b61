"""Where the training data stands, so a resumed run sees the same batches in the same order.

Lightning itself restores a ``StatefulDataLoader`` (torchdata) mid-epoch: its ``state_dict`` is
part of the loop state in every checkpoint. For a plain ``DataLoader`` it restarts the epoch's
iterator from the beginning, so a mid-epoch resume would see different batches. This module fills
that gap for the common case, a map-style dataset with a ``BatchSampler`` over a
``RandomSampler``, ``SequentialSampler`` or ``DistributedSampler`` (what ``DataLoader(shuffle=...)``
and Lightning's DDP set-up build):

* The order of an epoch is a function of a generator state when the epoch's pass starts: the
  sampler's own generator, or, for an unseeded ``RandomSampler``, torch's global generator, from
  which it draws its seed. Nothing is changed about either, so a run orders its data exactly as it
  would without the callback (as with ``ModelCheckpoint``). ``DistributedSampler`` orders by
  ``(seed, epoch)`` and needs nothing.
* The sampler under each training ``BatchSampler`` is wrapped (:class:`_Tracked`): when a pass
  over the data starts, it records the state that decides that pass's order. A checkpoint stores
  it with the number of batches already drawn this epoch.
* On resume, before the first batch is drawn, the pass gets the recorded state back (the global
  generator only for the sampler's one draw, then it is put back) and the wrapper skips the
  indices of the batches already trained on in its first pass (no data is loaded for them). Draws
  the uninterrupted run made between the checkpoint and its next batch (starting the next epoch's
  iterator, after a checkpoint that ended an epoch) are made again.

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


def _tracked(loader: Any) -> _Tracked | None:
    """The tracking wrapper of a plain training DataLoader's sampler (installed on first use)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(loader, DataLoader) or _is_stateful(loader) or not isinstance(batch_sampler, BatchSampler):
        return None
    if not isinstance(batch_sampler.sampler, _Tracked):
        batch_sampler.sampler = _Tracked(batch_sampler.sampler)  # type: ignore[arg-type]
    return batch_sampler.sampler


def _draws_from_global(sampler: Any) -> bool:
    """An unseeded ``RandomSampler``: its pass draws its seed from torch's global generator."""
    return isinstance(sampler, RandomSampler) and sampler.generator is None


class _Tracked(Sampler):
    """Wraps a training sampler: records the generator state that decides a pass's order when the
    pass starts and, once, replays a recorded one (``replay``) and leaves out the first ``skip``
    indices of a pass."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.skip = 0
        self.replay: torch.Tensor | None = None
        self.pass_start: torch.Tensor | None = _pass_state(inner)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        replay, self.replay = self.replay, None
        if not _draws_from_global(self.inner):
            self.pass_start = _generator_state(self.inner)
            yield from itertools.islice(iter(self.inner), skip, None)
            return
        current = torch.get_rng_state()
        if replay is not None:
            torch.set_rng_state(replay)
        self.pass_start = torch.get_rng_state()
        indices = iter(self.inner)
        first = next(indices, _END)  # the sampler draws its seed from the global generator here
        if replay is not None:
            torch.set_rng_state(current)  # the checkpoint's RNG state is restored at the first batch
        if first is not _END:
            yield from itertools.islice(itertools.chain([first], indices), skip, None)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


_END = object()


def _pass_state(sampler: Any) -> torch.Tensor | None:
    return torch.get_rng_state() if _draws_from_global(sampler) else _generator_state(sampler)


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
            "global": [t is not None and _draws_from_global(t.inner) for t in tracked],
        }

    def resume(self, trainer: Any, state: Mapping[str, Any], rng_state: torch.Tensor | None = None) -> None:
        """Before the first batch of a resumed run: replay the epoch's order and skip what was seen.

        Args:
            trainer: the trainer, after its train loaders were set up (``on_train_start``).
            state: what :meth:`state` returned when the checkpoint was taken.
            rng_state: torch's global generator state in the checkpoint (what an unseeded
                ``RandomSampler`` of the next epoch draws from, after a checkpoint that ended one).
        """
        loaders = train_loaders(trainer)
        num_batches = trainer.num_training_batches
        mid_epoch = 0 < state["batches"] < num_batches
        self._epoch_ended = state["batches"] >= num_batches
        generators = state["epoch_start"] if mid_epoch else state["now"]
        if len(generators) != len(loaders):
            log.warning(
                "the checkpoint recorded %d training loader(s), this run has %d; the data position is not restored",
                len(generators),
                len(loaders),
            )
            return
        self._global_draws = 0
        for loader, saved, start in zip(loaders, generators, state["epoch_start"], strict=True):
            tracked = _tracked(loader)
            if tracked is None:
                continue  # Lightning restores a stateful loader from the loop state
            if _draws_from_global(tracked.inner):
                if mid_epoch:
                    tracked.replay = start
                    tracked.skip = state["batches"] * loader.batch_sampler.batch_size
                elif self._epoch_ended and rng_state is not None:
                    tracked.replay = _after_base_seed(rng_state, loader)
                    self._global_draws += 1
                continue
            generator = getattr(tracked.inner, "generator", None)
            if saved is not None and isinstance(generator, torch.Generator):
                generator.set_state(saved)
            if mid_epoch:
                tracked.skip = state["batches"] * loader.batch_sampler.batch_size
            elif self._epoch_ended and loader.generator is not None:
                _draw_base_seed(loader)  # the next epoch's iterator drew it before its pass began
        if mid_epoch:
            log.info(
                "resuming epoch %d at batch %d: the first %d batch(es) of the epoch's order are skipped",
                state["epoch"],
                state["batches"],
                state["batches"],
            )

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
        for _ in range(getattr(self, "_global_draws", 0)):  # each unseeded RandomSampler's seed
            torch.empty((), dtype=torch.int64).random_()
        self._global_draws = 0

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
                log.warning(
                    "a mid-epoch resume of the training DataLoader %r may not be exact: %s. "
                    "Use torchdata's StatefulDataLoader (Lightning saves its position) for "
                    "an exact resume.",
                    type(loader).__name__,
                    reason,
                )
                return


def _after_base_seed(rng_state: torch.Tensor, loader: Any) -> torch.Tensor:
    """The global generator state an unseeded sampler's next pass draws from: the checkpoint's,
    after the loader's iterator drew its base seed from it (when the loader has no generator)."""
    generator = torch.Generator()
    generator.set_state(rng_state)
    if getattr(loader, "generator", None) is None:
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return generator.get_state()


def _draw_base_seed(loader: DataLoader) -> None:
    """The draw ``torch.utils.data`` makes when a DataLoader iterator starts (its base seed)."""
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
