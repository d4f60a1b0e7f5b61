"""Which ``checkpoint-N`` a run resumes from, and how the callback helps without moving anything.

``Trainer.train(resume_from_checkpoint=True)`` takes the newest ``checkpoint-N`` of ``output_dir``
(``get_last_checkpoint``) and loads it without checking anything. Our own saves never leave a
half-written folder under that name (the core writes into a hidden folder and renames it when
complete), but a folder can be damaged afterwards (a disk error, a copy cut short), edited by hand
on purpose, or written by the Trainer's own saving and cut short by a crash.

The choice is the core's (:func:`ckpt_plugins.restore.choose.latest_usable`): ours are verified
against their manifest, other ``checkpoint-N`` folders by :func:`trainer_folder_problems` (the
files the Trainer needs, readable by the core's HF reader). The callback runs it when the Trainer
is built and only reports: nothing is renamed, so a folder named explicitly
(``resume_from_checkpoint="out/checkpoint-800"``) is loaded as given, and a check never aborts a
resume the Trainer can do. What skips a damaged newest checkpoint:

* ``--resume_from_checkpoint True`` on the command line (a script that passes
  ``training_args.resume_from_checkpoint`` to ``train()``): the Trainer would take the string
  ``"True"`` as a path; the callback resolves it, when the Trainer is built, to the newest usable
  checkpoint (:func:`resolve_flag`);
* :func:`last_usable_checkpoint`, a drop-in for ``transformers.trainer_utils.get_last_checkpoint``.

With an object-store ``dirpath`` (``s3://...``) the Trainer cannot read the checkpoint where it is:
the one ``--resume_from_checkpoint`` resolves to (``True``, or its URL) is downloaded first, with
its checksums verified, into ``<output_dir>/.ckpt-plugins-resume/`` (:func:`localize`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ckpt_plugins.errors import CheckpointError
from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.layout.naming import parse_step_dir
from ckpt_plugins.restore.choose import Choice, latest_usable
from ckpt_plugins.storage import open_storage

__all__ = ["choose", "last_usable_checkpoint", "localize", "resolve_flag", "trainer_folder_problems", "with_memory"]

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def trainer_folder_problems(path: str) -> list[str]:
    """What is wrong with a ``checkpoint-N`` folder that has no manifest (empty: the Trainer can
    resume from it)."""
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


def choose(
    directory: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, mirror: str | None = None
) -> Choice:
    """The newest usable ``checkpoint-N`` of ``directory`` (nothing is moved); with ``mirror`` (the
    local-first tier), of both sides, the local copy preferred (a local path the Trainer reads)."""
    if mirror is not None:
        from ckpt_plugins.manager import CheckpointManager

        with CheckpointManager(  # rank 0 alone reads (a world of one)
            directory,
            mirror=mirror,
            read_only=True,
            dir_prefix=PREFIX,
            storage_options=storage_options,
            distributed=False,
        ) as reader:
            return latest_usable(reader.layout, foreign=trainer_folder_problems)
    storage, root = open_storage(os.fspath(directory), storage_options)
    return latest_usable(Layout(storage, root, PREFIX), foreign=trainer_folder_problems)


def with_memory(choice: Choice, directory: str | os.PathLike) -> Choice:
    """``choice``, or the in-memory tier's newest snapshot of ``directory`` when it verifies and is
    not older (docs/memory_tier.md): a ``checkpoint-N`` folder in shared memory holding the
    Trainer's own files, which the Trainer loads as it loads any. Rank 0's (it holds the files of
    every rank, as a ``checkpoint-N`` on disk does)."""
    from ckpt_plugins.memory.tier import MemoryTier
    from ckpt_plugins.options.memory import MemoryTierOptions

    tier = MemoryTier(
        MemoryTierOptions(), directory=os.fspath(directory), rank=0, world_size=1, prefix=PREFIX, read_only=True
    )
    usable = tier.usable() if os.path.isdir(tier.folder) else []
    if usable and (choice.step is None or usable[0] >= choice.step):
        log.info("the newest checkpoint is the in-memory snapshot of step %d (%s)", usable[0], tier.path_for(usable[0]))
        return Choice(usable[0], tier.path_for(usable[0]), choice.damaged)
    return choice


def last_usable_checkpoint(folder: str | os.PathLike, *, memory_tier: bool = False) -> str | None:
    """Like ``get_last_checkpoint(folder)``, but damaged checkpoints are skipped (with a warning);
    with ``memory_tier``, the in-memory tier's newest snapshot counts too (:func:`with_memory`).

    Example:
        >>> trainer.train(resume_from_checkpoint=last_usable_checkpoint(args.output_dir))  # doctest: +SKIP
    """
    choice = choose(folder)
    return (with_memory(choice, folder) if memory_tier else choice).path


def resolve_flag(value: Any, choice: Choice | None, output_dir: str) -> Any:
    """``TrainingArguments.resume_from_checkpoint`` as a script passes it on to ``train()``.

    ``HfArgumentParser`` gives ``--resume_from_checkpoint True`` as the string ``"True"``, which
    the Trainer would read as a path. ``"True"`` (``true``/``yes``/``1``) becomes the newest usable
    checkpoint of ``choice``, or None (start from scratch, with a warning) when there is none;
    without a choice (nothing was checked) it becomes ``True``, the Trainer's own pick. ``"False"``
    becomes None. Anything else (a path, None, a bool) is returned unchanged.
    """
    if not isinstance(value, str) or os.path.exists(value):
        return value
    word = value.strip().lower()
    if word in _FALSE:
        log.info("--resume_from_checkpoint %s: not resuming", value)
        return None
    if word not in _TRUE:
        return value
    if choice is None:
        return True
    if choice.path is None:
        log.warning(
            "--resume_from_checkpoint %s: %s has no usable checkpoint; this run starts from scratch", value, output_dir
        )
        return None
    log.info("--resume_from_checkpoint %s: resuming from %s, the newest usable checkpoint", value, choice.path)
    return choice.path


SCRATCH = ".ckpt-plugins-resume"  # in output_dir: local copies of remote checkpoints to resume from


def localize(value: Any, dirpath: str, output_dir: str, storage_options: Mapping[str, Any] | None) -> Any:
    """A ``resume_from_checkpoint`` in a URL ``dirpath`` (``s3://...``) as a local folder the Trainer
    can read: the checkpoint is downloaded (checksums verified) to ``<output_dir>/.ckpt-plugins-resume/
    checkpoint-N``. Anything else is returned unchanged."""
    if "://" not in dirpath or not isinstance(value, str) or os.path.exists(value):
        return value
    storage, root = open_storage(dirpath, storage_options)
    name = value.rstrip("/").rsplit("/", 1)[-1]
    path = storage.join(root, name)
    inside = value.rstrip("/") in (path, f"{dirpath.rstrip('/')}/{name}")
    if not inside or parse_step_dir(name, PREFIX) is None:
        return value
    from ckpt_plugins.persist.mirror import download

    target = os.path.join(output_dir, SCRATCH, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    log.info("resuming from %s/%s: downloading it to %s (checksums verified)", dirpath.rstrip("/"), name, target)
    return download(storage, path, target)
