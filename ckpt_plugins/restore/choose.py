"""Which checkpoint to resume from: the newest one that is usable, decided in one place.

``CheckpointManager.restore("latest")`` (and ``"best"``), the adapters' resume checks and the CLI
all need the same answer: the newest checkpoint that is intact. A damaged one (a file missing, a
size or checksum that no longer matches the manifest, a manifest that does not parse) is skipped
with a warning that names what is wrong, newest first, until one is good.

Two rules make this safe to call from anywhere:

* Nothing is moved unless the caller asks (``quarantine=True``), and a ``CheckpointManager`` never
  asks while it is being built: a folder someone edited on purpose, and then names explicitly as
  the one to resume from, must still be there under its name.
* A path the caller lists in ``keep`` (the checkpoint a run was explicitly told to resume from) is
  never moved, damaged or not.

A folder with the checkpoint name but without a manifest is not one of ours (an interrupted save by
another writer, or another tool's checkpoint). It is a candidate only when the caller passes
``foreign``, a check that lists what is wrong with such a folder (the HF adapter checks the files
the Trainer needs); otherwise it is not a checkpoint at all, as everywhere else in the core.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ckpt_plugins.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.retention.policy import CheckpointRecord, ranked_steps

__all__ = ["Choice", "Damaged", "candidates", "first_usable", "latest_usable"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Damaged:
    """A checkpoint that was skipped because it is damaged."""

    step: int
    path: str
    problems: tuple[str, ...]
    """What is wrong, one sentence each (each names the file)."""
    moved_to: str | None = None
    """Where it was moved with ``quarantine=True`` (``<name>.damaged-<token>``); None: left in place."""


@dataclass(frozen=True)
class Choice:
    """The newest usable checkpoint (``step``/``path`` None when there is none) and what was skipped."""

    step: int | None
    path: str | None
    damaged: tuple[Damaged, ...] = ()
    """The newer checkpoints that were skipped, newest first."""


def latest_usable(
    layout: Layout,
    *,
    foreign: Callable[[str], list[str]] | None = None,
    quarantine: bool = False,
    keep: Iterable[str | os.PathLike[str]] = (),
) -> Choice:
    """The newest checkpoint under ``layout`` that passes verification.

    Args:
        layout: the directory and folder naming (``manager.layout``).
        foreign: check for folders without a manifest: returns their problems (``[]``: usable).
            None: such folders are not candidates.
        quarantine: move each damaged checkpoint aside (``Layout.quarantine``) so that a tool that
            takes the newest folder by name (``resume_from_checkpoint=True``) no longer sees it.
            Rank 0 only, on a writable directory.
        keep: paths that are never moved, even when damaged.

    Returns:
        The choice; every damaged checkpoint newer than it is logged once (WARNING).
    """
    kept = {_norm(p) for p in keep}
    damaged: list[Damaged] = []
    for step, path, ours in _candidates(layout, foreign is not None):
        if ours:
            problems = layout.verify(path)
        else:
            assert foreign is not None
            problems = foreign(path)
        if not problems:
            if damaged:
                log.warning("the newest usable checkpoint in %s is step %d (%s)", layout.root, step, path)
            return Choice(step, path, tuple(damaged))
        moved = None
        if quarantine and _norm(path) not in kept:
            moved = layout.quarantine(step, "; ".join(problems))
        else:
            log.warning("checkpoint step %d (%s) is damaged: %s", step, path, "; ".join(problems))
        damaged.append(Damaged(step, path, tuple(problems), moved))
    if damaged:
        log.warning("no usable checkpoint in %s: all %d are damaged", layout.root, len(damaged))
    return Choice(None, None, tuple(damaged))


def first_usable(steps: Sequence[int], attempt: Callable[[int], T], *, what: str, directory: str) -> T:
    """``attempt(step)`` for each of ``steps`` (best first) until one is not damaged.

    The fallback of ``restore("latest")`` and ``restore("best")``: ``attempt`` reads the checkpoint
    and raises ``CorruptCheckpointError`` when it is damaged; that step is skipped with a warning.

    Raises:
        CheckpointNotFoundError: ``steps`` is empty, or every one of them is damaged.
    """
    for i, step in enumerate(steps):
        try:
            return attempt(step)
        except CorruptCheckpointError as exc:
            fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint left"
            log.warning("checkpoint step %d is damaged (%s); %s", step, exc, fallback)
    raise CheckpointNotFoundError(
        f"no {'usable ' if steps else ''}checkpoint to restore as {what!r} in {directory}"
        + (f" (all {len(steps)} candidates are damaged)" if steps else "")
    )


def candidates(
    which: str,
    *,
    steps: Callable[[], list[int]],
    records: Callable[[], list[CheckpointRecord]],
    monitor: str | None,
    mode: str,
) -> list[int]:
    """The steps ``restore(which)`` tries, best first: ``"latest"`` newest first, ``"best"`` by
    ``monitor`` and ``mode``."""
    if which == "latest":
        return steps()[::-1]
    if monitor is None:
        raise ConfigError(
            "restore('best') needs $monitor (and $mode) on the CheckpointManager",
            option="monitor",
            value=None,
            mentions=("mode",),
        )
    return ranked_steps(records(), monitor, mode)


def _candidates(layout: Layout, with_foreign: bool) -> list[tuple[int, str, bool]]:
    """``(step, path, has a manifest)`` of the checkpoint folders, newest first (ours as the layout
    lists them: a mirror's are on both sides)."""
    found = [(c.step, c.path, True) for c in layout.committed()]
    if with_foreign:
        storage = layout.storage
        for name in storage.listdir(layout.root):
            step = layout.step_of(name)
            path = storage.join(layout.root, name)
            if step is not None and not storage.exists(storage.join(path, MANIFEST_NAME)) and storage.isdir(path):
                found.append((step, path, False))
    return sorted(found, reverse=True)


def _norm(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path).rstrip("/")
    return os.path.realpath(text) if "://" not in text else text
