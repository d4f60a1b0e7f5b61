"""What checkpoints a folder holds, in every format the commands read, and which rules keep them.

A run folder may hold our folders (``step_N``, the HF adapter's ``checkpoint-N``, the Lightning
plugin's ``epoch=0-step=4.ckpt``: anything with a ``manifest.json``), Lightning ``.ckpt`` files,
Trainer-written ``checkpoint-N`` folders, torch and safetensors files. Each becomes an
:class:`Entry`; nothing is read but manifests, ``trainer_state.json`` and file sizes.

Retention works on *numbered* checkpoints: those whose name carries a step (``step_4``,
``checkpoint-4``, ``epoch=0-step=4.ckpt``, ``model_4.pt``). A name without one (``last.ckpt``)
is *named*: listed, verified, never pruned.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ckpt_plugins.cli.storage import open_path
from ckpt_plugins.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt_plugins.files.manifest import MANIFEST_NAME, Manifest
from ckpt_plugins.files.single_file import is_single_file
from ckpt_plugins.formats import detect_format
from ckpt_plugins.formats.hf_folder import HF_WRITER
from ckpt_plugins.layout.commit import DAMAGED_SUFFIX, Layout
from ckpt_plugins.layout.naming import natural_key
from ckpt_plugins.retention import CheckpointRecord, RetentionContext, build_policy

__all__ = [
    "RULE_FLAGS",
    "Entry",
    "choose_rules",
    "decide",
    "describe_rules",
    "folder_size",
    "kind_of",
    "layout_of",
    "rule_flags",
    "run_folder_entries",
    "scan",
    "step_from_name",
]

RULE_FLAGS = ("keep_last", "keep_best", "monitor", "mode", "keep_every_n_steps", "keep_time_interval")
"""The retention flags, as the manager takes them and as a manifest's ``retention`` stores them."""

_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_NOT_CHECKPOINTS = ("training_args.bin",)  # the Trainer's pickled TrainingArguments, beside its final model
_NAMED_STEP = re.compile(r"(?:^|[^a-z])(?:step[=_-]?|checkpoint-)(\d+)(?![0-9])", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"(\d+)(?:\.[A-Za-z]+)?$")


def step_from_name(name: str) -> int | None:
    """The step a checkpoint name carries: ``step=N``, ``step_N``, ``checkpoint-N``, else a
    trailing number (``model_500.pt``); ``None`` for names without one (``last.ckpt``)."""
    match = _NAMED_STEP.search(name) or _LAST_NUMBER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class Entry:
    """One checkpoint found in a folder."""

    name: str
    path: str  # what open_path() opens: an absolute local path, or the URL of a remote one
    format: str  # "ckpt_plugins" or a foreign format name (see ckpt_plugins.formats)
    step: int | None  # the manifest's step, else the name's; None when neither has one
    numbered: bool  # the name carries a step: retention applies to it
    size: int = 0
    wall_time: float | None = None  # commit time (ours) or modification time (foreign)
    metrics: dict[str, float] = field(default_factory=dict)
    damaged: str | None = None  # why the manifest cannot be read
    manifest: Manifest | None = None
    single_file: bool = False  # our one-file .ckpt (files/single_file): no manifest, a data checksum
    kind: str = ""  # "lightning" / "hf" for our checkpoints written by an adapter


def layout_of(storage: Any, checkpoint: str) -> Layout:
    """The :class:`Layout` of the folder that holds ``checkpoint`` (to read or verify it)."""
    parent = checkpoint.rstrip("/").rsplit("/", 1)[0] if "/" in checkpoint.rstrip("/") else checkpoint
    return Layout(storage, parent)


def kind_of(path: str) -> str:
    """``"lightning"``, ``"hf"`` or ``"other"``: which framework wrote the checkpoint at ``path``."""
    storage, root = open_path(path)
    if storage.exists(storage.join(root, MANIFEST_NAME)):
        try:
            meta = layout_of(storage, root).read_manifest(root).user_metadata
        except CorruptCheckpointError:
            return "other"
        if meta.get("written_by") == HF_WRITER:
            return "hf"
        return "lightning" if meta.get("kind") == "lightning" else "other"
    return {"lightning": "lightning", "hf": "hf"}.get(detect_format(path) or "", "other")


def folder_size(storage: Any, path: str) -> int:
    """Bytes of a file, or of every file under a folder."""
    if not storage.isdir(path):
        return storage.size(path) if storage.exists(path) else 0
    return sum(folder_size(storage, storage.join(path, name)) for name in storage.listdir(path))


def _trainer_metrics(folder: str) -> dict[str, float]:
    """Numbers the Trainer logged at this checkpoint's step (loss, eval_loss, ...)."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        step = state.get("global_step")
        merged: dict[str, float] = {}
        for record in state.get("log_history") or []:
            if isinstance(record, dict) and record.get("step") == step:
                merged.update(
                    {
                        k: float(v)
                        for k, v in record.items()
                        if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
                    }
                )
        return merged
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _ours(storage: Any, root: str, name: str, path: str) -> Entry:
    entry = Entry(
        name,
        path,
        "ckpt_plugins",
        step_from_name(name),
        step_from_name(name) is not None,
        size=folder_size(storage, path),
    )
    try:
        manifest = Layout(storage, root).read_manifest(path)
    except CorruptCheckpointError as exc:
        entry.damaged = str(exc)
        return entry
    entry.manifest, entry.step, entry.metrics = manifest, manifest.step, dict(manifest.metrics)
    entry.wall_time = manifest.wall_time
    meta = manifest.user_metadata
    entry.kind = "hf" if meta.get("written_by") == HF_WRITER else str(meta.get("kind") or "")
    return entry


def memory_snapshots(directory: str, shm: str = "/dev/shm") -> list[Entry]:
    """The in-memory tier's snapshots of ``directory`` (``ckpt_plugins.memory``): each rank's own,
    then the peer copies, by step; ``kind`` is ``"memory rank R"`` (``"memory rank R, copy"``).
    Listed beside the directory's by ``ls``; never touched by ``prune``."""
    from ckpt_plugins.memory.place import snapshot_root
    from ckpt_plugins.storage.local import LocalStorage

    base, storage, found = snapshot_root(shm, directory), LocalStorage(), []
    for folder in sorted(storage.listdir(base)):
        if not folder.startswith("rank") or not folder[4:].isdigit():
            continue
        for sub, what in ((folder, ""), (f"{folder}/peer", ", copy")):
            root = os.path.join(base, sub)
            for name in sorted(storage.listdir(root), key=lambda n: step_from_name(n) or -1):
                path = os.path.join(root, name)
                if name.startswith(".") or not storage.exists(os.path.join(path, MANIFEST_NAME)):
                    continue
                entry = _ours(storage, root, name, path)
                entry.kind = f"memory rank {folder[4:]}{what}"
                entry.numbered = False  # no retention rule applies: the tier keeps its newest
                found.append(entry)
    return found


def scan(directory: str, prefix: str | None = None) -> list[Entry]:
    """Every checkpoint in ``directory`` (numbered ones by step, then named ones by name).

    Args:
        directory: a run folder (local path or fsspec URL; foreign formats local only).
        prefix: only names starting with it (``--dir-prefix``).

    Raises:
        CheckpointNotFoundError: ``directory`` is not a folder.
    """
    storage, root = open_path(directory)
    if not storage.isdir(root):
        raise CheckpointNotFoundError(
            f"{directory}: no such directory; pass the folder that holds the "
            "checkpoints (step_N, checkpoint-N, *.ckpt, ...)"
        )
    local = storage.local_path(root)
    entries = []
    for name in storage.listdir(root):
        if (
            name.startswith(".")
            or DAMAGED_SUFFIX in name
            or name in _NOT_CHECKPOINTS
            or (prefix and not name.startswith(prefix))
        ):
            continue
        path = storage.join(root, name)
        if storage.isdir(path) and storage.exists(storage.join(path, MANIFEST_NAME)):
            entry = _ours(storage, root, name, path)
            if local is None:  # a path open_storage opens again (memory://run/step_3, not /run/step_3)
                entry.path = f"{directory.rstrip('/')}/{name}"
            entries.append(entry)
            continue
        if local is None:
            continue  # foreign formats are read from local paths only
        fmt = detect_format(path)
        is_file = not storage.isdir(path)
        if fmt is None or fmt == "ckpt_plugins" or (is_file and not name.lower().endswith(_FILE_SUFFIXES)):
            continue
        step = step_from_name(name)
        ours = is_file and is_single_file(storage, path)  # a .ckpt the Lightning plugin wrote
        entry = Entry(
            name,
            path,
            "ckpt_plugins" if ours else fmt,
            step,
            step is not None,
            size=folder_size(storage, path),
            wall_time=os.path.getmtime(path),
            kind="lightning" if ours else "",
            single_file=ours,
        )
        if fmt == "hf":
            entry.metrics = _trainer_metrics(path)
        entries.append(entry)
    return sorted(entries, key=lambda e: (not e.numbered, e.step if e.numbered else 0, natural_key(e.name)))


def run_folder_entries(directory: str) -> list[Entry]:
    """The checkpoints *inside* ``directory`` when it is a run folder; ``[]`` for a checkpoint.

    A folder that is itself a foreign checkpoint (a Trainer ``output_dir`` holding its final
    ``model.safetensors``) is a run folder too when it holds checkpoint folders; its own files
    (``model.safetensors``, ``optimizer.pt``) are then not listed one by one.
    """
    storage, root = open_path(directory)
    if not storage.isdir(root) or storage.exists(storage.join(root, MANIFEST_NAME)):
        return []
    entries = scan(directory)
    if detect_format(directory) is not None:
        entries = [e for e in entries if storage.isdir(storage.join(root, e.name))]
    return entries


def choose_rules(entries: Iterable[Entry], flags: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The retention rules to show or apply, and where they come from.

    Rule flags given on the command line win (a what-if). Otherwise the rules the run stored in
    its newest readable manifest; ``None`` when no manifest stored any (foreign checkpoints, or
    manifests written before rules were stored).
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        return {k: flags.get(k) if k != "mode" else flags.get("mode") or "min" for k in RULE_FLAGS}, "command line"
    stored = [e for e in entries if e.manifest is not None and e.manifest.retention is not None]
    if not stored:
        return None, "rules unknown"
    newest = max(stored, key=lambda e: (e.step or 0, e.wall_time or 0.0))
    retention = newest.manifest.retention if newest.manifest is not None else None
    return dict(retention or {}), f"stored in {newest.name}"


def describe_rules(rules: dict[str, Any] | None) -> str:
    """``keep_last=1 keep_best=1 monitor=loss mode=min`` (``keep_all`` when no rule is set)."""
    if rules is None:
        return "rules unknown"
    parts = [f"{k}={rules[k]}" for k in RULE_FLAGS if rules.get(k) is not None and k != "mode"]
    if rules.get("monitor") is not None:
        parts.append(f"mode={rules.get('mode') or 'min'}")
    return " ".join(parts) or "keep_all"


def decide(entries: list[Entry], rules: dict[str, Any], now: float | None = None) -> dict[str, list[str] | None]:
    """Reasons each entry is kept (``[]``: the rules would prune it), by entry name.

    Numbered entries are grouped by step (``-v1`` copies share their step's fate); a damaged one
    counts as the oldest checkpoint with no metrics, as the manager counts it. Named entries get
    ``["named"]``: they are never pruned.

    Raises:
        ConfigError: a rule flag has a bad value (named by :func:`build_policy`).
    """
    policy = build_policy(**{k: rules.get(k) for k in RULE_FLAGS if k != "mode"}, mode=rules.get("mode") or "min")
    by_step: dict[int, list[Entry]] = {}
    for entry in entries:
        if entry.numbered and entry.step is not None:
            by_step.setdefault(entry.step, []).append(entry)
    records = [
        CheckpointRecord(
            step, max(e.wall_time or 0.0 for e in group), next((e.metrics for e in group if e.metrics), {})
        )
        for step, group in by_step.items()
    ]
    decision = policy.decide(records, RetentionContext(now=time.time() if now is None else now))
    out: dict[str, list[str] | None] = {}
    for entry in entries:
        if not (entry.numbered and entry.step is not None):
            out[entry.name] = ["named"]
        else:
            out[entry.name] = decision.keep.get(entry.step, [])
    return out


def rule_flags(args: Any) -> dict[str, Any]:
    """The rule flags of an ``ls``/``prune`` command line, by manager option name."""
    return {k: getattr(args, k, None) for k in RULE_FLAGS}
