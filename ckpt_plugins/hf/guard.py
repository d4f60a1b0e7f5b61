"""Keep a damaged newest ``checkpoint-N`` away from ``resume_from_checkpoint=True``.

``Trainer.train(resume_from_checkpoint=True)`` takes the newest ``checkpoint-N`` folder in
``output_dir`` (``get_last_checkpoint``) and loads it without checking anything. Our own saves
can never leave a half-written folder under that name (the core writes into a hidden folder and
renames it when complete), but a folder can still be damaged afterwards (a disk error, a copy
cut short, a file edited by hand), and folders written by the Trainer's own saving, or by another
tool, may be incomplete.

So before the Trainer can pick one (the callback runs this from ``on_init_end``, which comes
before ``train()`` looks for a checkpoint), :func:`guard_latest` checks the newest folder:

* one of ours (it has a ``manifest.json``): every file is checked against the manifest's size
  and checksum;
* any other ``checkpoint-N``: its files are read with the core's Hugging Face reader (the files
  the Trainer needs must be present and readable).

A damaged folder is renamed to ``checkpoint-N.damaged-<time>`` (a name neither the Trainer nor
the core lists; nothing is deleted), with a warning that says what was wrong, and the next newest
is checked, until one is good or none is left. The Trainer then resumes from the good one.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from ckpt_plugins.errors import CheckpointError
from ckpt_plugins.manifest import MANIFEST_NAME
from ckpt_plugins.storage import LocalStorage

__all__ = ["GuardFinding", "guard_latest", "trainer_checkpoints"]

log = logging.getLogger(__name__)

# The Trainer's own pattern (transformers.trainer_utils._re_checkpoint), kept here so that this
# module also answers what get_last_checkpoint would pick.
_TRAINER_CHECKPOINT = re.compile(r"^checkpoint\-(\d+)$")
_REQUIRED_ANY = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class GuardFinding:
    """One damaged checkpoint that was moved aside."""

    path: str
    """Where it was (``.../checkpoint-N``)."""
    moved_to: str
    """Where it is now (``.../checkpoint-N.damaged-<time>``)."""
    problems: tuple[str, ...]
    """What was wrong, one sentence each."""


def trainer_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the folders ``get_last_checkpoint`` considers, newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _TRAINER_CHECKPOINT.search(name)
        path = os.path.join(directory, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def problems_of(path: str) -> list[str]:
    """What is wrong with one ``checkpoint-N`` folder (empty: the Trainer can resume from it)."""
    storage = LocalStorage()
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        # TODO(core request HF-2): CheckpointManager.verify(step) instead of the CLI's helper.
        from ckpt_plugins.cli import _verify_ours
        return _verify_ours(storage, path)
    problems = []
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        problems.append(f"{path}: trainer_state.json is missing (the Trainer cannot resume without it)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _REQUIRED_ANY):
        problems.append(f"{path}: no model or adapter weights file")
    if problems:
        return [*problems, f"{path}: no {MANIFEST_NAME} either; it looks like an interrupted save"]
    from ckpt_plugins.formats.hf_folder import read_hf_folder
    try:
        read_hf_folder(path)
    except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{path}: cannot be read: {exc}")
    return problems


def guard_latest(directory: str) -> list[GuardFinding]:
    """Move damaged newest ``checkpoint-N`` folders of ``directory`` aside (see the module doc).

    Call it on one process only (rank 0), before the Trainer looks for a checkpoint.

    Args:
        directory: the Trainer's ``output_dir`` (where ``resume_from_checkpoint=True`` looks).

    Returns:
        The folders moved aside, newest first (empty when the newest one is good, or none exists).
    """
    findings = []
    for step, path in trainer_checkpoints(directory):
        problems = problems_of(path)
        if not problems:
            if findings:
                log.warning("resume_from_checkpoint=True will use %s, the newest intact checkpoint", path)
            break
        # TODO(core request HF-3): CheckpointManager.quarantine(step, reason).
        moved = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(path, moved)
        LocalStorage().fsync_dir(directory)
        log.warning("checkpoint step %d is damaged and will not be resumed from; moved %s to %s. "
                    "Problems: %s", step, path, moved, "; ".join(problems))
        findings.append(GuardFinding(path, moved, tuple(problems)))
    return findings
