"""Keep a damaged newest ``checkpoint-N`` away from ``resume_from_checkpoint=True``.

``Trainer.train(resume_from_checkpoint=True)`` takes the newest ``checkpoint-N`` folder in
``output_dir`` (``get_last_checkpoint``) and loads it without checking anything. Our own saves
can never leave a half-written folder under that name (the core writes into a hidden folder and
renames it when complete), but a folder can still be damaged afterwards (a disk error, a copy
cut short, a file edited by hand), and folders written by the Trainer's own saving, or by another
tool, may be incomplete.

So before the Trainer can pick one (the callback runs this from ``on_init_end``, which comes
before ``train()`` looks for a checkpoint), :func:`guard_latest` checks the newest folder:

* one of ours (it has a ``manifest.json``): every file against the manifest's size and checksum
  (``CheckpointManager.verify``);
* any other ``checkpoint-N``: the files the Trainer needs must be present, and everything must be
  readable by the core's Hugging Face reader.

A damaged folder is moved aside by ``CheckpointManager.quarantine`` (renamed to
``checkpoint-N.damaged-<token>``, a name neither the Trainer nor the core lists; nothing is
deleted) with a warning that says what was wrong, and the next newest is checked, until one is
good or none is left. The Trainer then resumes from the good one.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ckpt_plugins.errors import CheckpointError
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.files.manifest import MANIFEST_NAME

__all__ = ["GuardFinding", "guard_latest", "problems_of", "trainer_checkpoints"]

log = logging.getLogger(__name__)

# The Trainer's own pattern (transformers.trainer_utils._re_checkpoint): what get_last_checkpoint sees.
_TRAINER_CHECKPOINT = re.compile(r"^checkpoint\-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class GuardFinding:
    """One damaged checkpoint that was moved aside."""

    path: str
    """Where it was (``.../checkpoint-N``)."""
    moved_to: str
    """Where it is now (``.../checkpoint-N.damaged-<token>``)."""
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


def problems_of(manager: CheckpointManager, step: int, path: str) -> list[str]:
    """What is wrong with one ``checkpoint-N`` folder (empty: the Trainer can resume from it)."""
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return manager.verify(step)
    problems = []
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        problems.append(f"{path}: trainer_state.json is missing (the Trainer cannot resume without it)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHTS):
        problems.append(f"{path}: has no model or adapter weights file")
    if problems:
        return [*problems, f"{path}: has no {MANIFEST_NAME} either: an interrupted save by another writer"]
    from ckpt_plugins.formats.hf_folder import read_hf_folder
    try:
        read_hf_folder(path)
    except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{path}: cannot be read: {exc}")
    return problems


def guard_latest(manager: CheckpointManager) -> list[GuardFinding]:
    """Move damaged newest ``checkpoint-N`` folders of the manager's directory aside.

    Call it on rank 0 only, with a writable manager (``dir_prefix="checkpoint-"``) on the
    Trainer's ``output_dir``, before the Trainer looks for a checkpoint.

    Returns:
        The folders moved aside, newest first (empty when the newest one is good, or none exists).
    """
    findings = []
    for step, path in trainer_checkpoints(manager.root):
        if os.path.basename(path) != os.path.basename(manager.path_for(step)):
            log.warning("%s: a step written with leading zeros; not checked", path)
            continue
        problems = problems_of(manager, step, path)
        if not problems:
            if findings:
                log.warning("resume_from_checkpoint=True will use %s, the newest intact checkpoint", path)
            break
        reason = ("it will not be resumed from; " + "; ".join(problems))
        moved = manager.quarantine(step, reason)
        findings.append(GuardFinding(path, moved, tuple(problems)))
    return findings
