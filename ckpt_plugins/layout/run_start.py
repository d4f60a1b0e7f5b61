"""The start-of-run check: does this run begin before checkpoints that already exist?

Checkpoints are ordered by step, and the core refuses a save at or before an existing step. A run
that starts at step ``s`` in a directory holding checkpoints after ``s`` therefore meets them at
its first save. Checked at the start of the run instead (``CheckpointManager.start_run``), there
are two cases, the same for every adapter:

* **A fresh run** (not resumed): its saves would collide with an earlier run's checkpoints. That is
  almost always a reused directory, so it is refused before any training, with
  :class:`~ckpt_plugins.errors.StepExistsError` and the caller's hint on how to resume (unless
  ``overwrite=True``).
* **A resumed run** (from the checkpoint at ``s``, or from a path elsewhere): training frameworks
  allow resuming from an older checkpoint, and so does the core. The later checkpoints are an
  abandoned continuation, but they are not removed up front: a crash before this run's first save
  commits still leaves them all. When this run's first save commits, the checkpoint at its step is
  replaced atomically and the later ones are removed, so that "resume from the newest" never jumps
  back to the abandoned continuation. One WARNING names them at the start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ckpt_plugins.errors import StepExistsError

__all__ = ["check_run_start"]

log = logging.getLogger(__name__)

DEFAULT_HINT = (
    "Resume from the newest of them, pass overwrite=True to replace them as this run's saves commit, "
    "or use another directory."
)


def check_run_start(
    directory: str, steps: Iterable[int], start: int, *, resumed: bool, overwrite: bool, hint: str | None = None
) -> list[int]:
    """The committed steps after ``start``, checked as the module docstring says.

    Args:
        directory: named in the messages.
        steps: the committed steps.
        start: the step the run starts at (the resumed step, or 0).
        resumed: the run continues from a checkpoint of step ``start``.
        overwrite: a fresh run may replace them too.
        hint: what the caller's user should do, in their terms (flags, method names), for the error.

    Returns:
        The later steps (ascending), which this run's first commit will replace; ``[]`` if none.

    Raises:
        StepExistsError: a fresh run, without ``overwrite``, before later checkpoints.
    """
    later = sorted(s for s in steps if s > start)
    if not later:
        return []
    if not (resumed or overwrite):
        raise StepExistsError(
            f"{directory} holds checkpoints at steps {later} of an earlier run, after step {start} where this run "
            f"starts without resuming: its saves would collide with them. {hint or DEFAULT_HINT}"
        )
    why = f"this run resumed from step {start}" if resumed else f"overwrite=True, this run starts at step {start}"
    log.warning(
        "%s holds checkpoints at steps %s after step %d (%s); they stay until this run's first save "
        "commits, which replaces the one at its step and removes the later ones",
        directory,
        later,
        start,
        why,
    )
    return later
