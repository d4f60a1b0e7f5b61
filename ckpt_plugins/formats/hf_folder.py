"""Reading Hugging Face folders: Trainer ``checkpoint-N/`` and ``save_pretrained`` output.

The folder's files become one dict, with only the parts that are present:

- ``"model"``: ``model.safetensors``, ``model.safetensors.index.json`` + shards,
  ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (a flat state dict);
- ``"adapter"``: PEFT's ``adapter_model.safetensors`` or ``adapter_model.bin``;
- ``"optimizer"``, ``"scheduler"``, ``"scaler"``: ``optimizer.pt``, ``scheduler.pt``,
  ``scaler.pt`` (the objects as saved, usually state dicts);
- ``"rng_state"``: ``rng_state.pth``, or ``{rank: ...}`` from ``rng_state_<rank>.pth``;
- ``"trainer_state"``: ``trainer_state.json``, parsed.

Sharded weights are merged into one flat ``"model"`` dict. When both safetensors and ``.bin``
weights exist, the safetensors ones are read. ``training_args.bin`` (a pickled
``TrainingArguments``, which cannot be loaded without full pickle) and ``config.json`` are not
read. ``rng_state*.pth`` holds a numpy uint32 array; the exact numpy globals it needs are on
``_pickle.DATA_ONLY_GLOBALS``. transformers itself is not imported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.tensor_file import checksum_file
from ckpt_plugins.formats._pickle import MapLocation, load_pickle
from ckpt_plugins.formats.safetensors_file import read_safetensors
from ckpt_plugins.tree.walk import join, select

__all__ = ["HF_MARKER_FILES", "HF_WRITER", "holds_native_files", "read_hf_folder", "read_native_files"]

log = logging.getLogger(__name__)

HF_MARKER_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "trainer_state.json",
    "optimizer.pt",
)
"""Any one of these files makes a folder an HF checkpoint."""

# (key, candidate weight files in order of preference; ".index.json" means sharded)
_WEIGHTS = (
    (
        "model",
        (
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ),
    ),
    ("adapter", ("adapter_model.safetensors", "adapter_model.bin")),
)
_PICKLES = (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("scaler", "scaler.pt"))
_RNG_RANK = re.compile(r"rng_state_(\d+)\.pth")
_SKIPPED = ("training_args.bin",)
_OURS = re.compile(r"(state|rank_\d+)(\.[A-Za-z0-9_-]+)?\.safetensors|manifest\.json|rank_\d+\.part\.json")


class _Reader:
    """Reads the files of one folder with one set of options."""

    def __init__(
        self,
        folder: str,
        map_location: MapLocation,
        allow_unsafe: bool,
        include: Callable[[str], bool] | None,
        meta: bool = False,
    ) -> None:
        self.meta = meta
        self.folder = folder
        self.map_location = map_location
        self.allow_unsafe = allow_unsafe
        self.include = include

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def weights_file(self, name: str, prefix: str) -> dict[str, Any]:
        path = self.path(name)
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"{path} is missing: the folder's index lists it.")
        if name.endswith(".safetensors"):
            return read_safetensors(
                path, map_location=self.map_location, include=self.include, prefix=prefix, meta=self.meta
            )
        return self.pickle(path, prefix)

    def pickle(self, path: str, prefix: str) -> Any:
        return load_pickle(
            path,
            map_location=self.map_location,
            allow_unsafe_pickle=self.allow_unsafe,
            include=self.include,
            prefix=prefix,
        )

    def sharded(self, index_name: str, prefix: str) -> dict[str, Any]:
        index_path = self.path(index_name)
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"{index_path} has no 'weight_map' object.")
        merged: dict[str, Any] = {}
        for shard in sorted(set(weight_map.values())):
            merged.update(self.weights_file(shard, prefix))
        return merged

    def weights(self, key: str, candidates: tuple[str, ...]) -> dict[str, Any] | None:
        for name in candidates:
            if os.path.isfile(self.path(name)):
                log.debug("Reading %s weights from %s", key, self.path(name))
                if name.endswith(".index.json"):
                    return self.sharded(name, key)
                return self.weights_file(name, key)
        return None

    def rng_state(self) -> Any:
        single = self.path("rng_state.pth")
        if os.path.isfile(single):
            return self.pickle(single, "rng_state")
        ranks: dict[int, Any] = {}
        for name in sorted(os.listdir(self.folder)):
            match = _RNG_RANK.fullmatch(name)
            if match:
                state = self.pickle(self.path(name), join("rng_state", int(match.group(1))))
                if self.include is None or state:
                    ranks[int(match.group(1))] = state
        return dict(sorted(ranks.items())) or None

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, candidates in _WEIGHTS:
            out[key] = self.weights(key, candidates)
        for key, name in _PICKLES:
            path = self.path(name)
            out[key] = self.pickle(path, key) if os.path.isfile(path) else None
        out["rng_state"] = self.rng_state()
        state_path = self.path("trainer_state.json")
        if os.path.isfile(state_path):
            state = _read_json(state_path)
            out["trainer_state"] = (
                state if self.include is None else select(state, self.include, "trainer_state", empty={})
            )
        for name in _SKIPPED:
            if os.path.isfile(self.path(name)):
                log.debug("Not reading %s (a pickle of Python objects)", self.path(name))
        # Drop absent parts, and parts the include predicate emptied.
        return {k: v for k, v in out.items() if v is not None and (self.include is None or v)}


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"Cannot read {path}: not valid JSON ({exc}).") from exc


def read_hf_folder(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
    meta: bool = False,
) -> dict[str, Any]:
    """Read an HF checkpoint folder into ``{"model": ..., "optimizer": ..., ...}``.

    Args:
        path: the folder (``checkpoint-N`` or a ``save_pretrained`` folder).
        map_location: device for tensors (a device string for safetensors files).
        allow_unsafe_pickle: use full pickle for the ``.pt``/``.pth``/``.bin`` files.
        include: keep only leaves whose key path (``"model.<tensor name>"``,
            ``"optimizer.state.0.exp_avg"``, ...) satisfies it; safetensors weights that are not
            selected are never read.
        meta: safetensors weights as ``meta`` tensors (shapes and dtypes, no data read).

    Returns:
        A dict with the keys described in this module's docstring, for the parts present.

    Raises:
        UnsafeCheckpointError: a pickle file needs globals outside the allow-list (named).
        CorruptCheckpointError: a file is truncated, unreadable, or missing from its index.
    """
    return _Reader(os.fspath(path), map_location, allow_unsafe_pickle, include, meta).read()


HF_WRITER = "ckpt_plugins.hf"
"""``user_metadata["written_by"]`` of the checkpoints ``ckpt_plugins.hf`` commits."""


def holds_native_files(manifest: Any) -> bool:
    """Whether one of our checkpoints was written by ``ckpt_plugins.hf`` with the Trainer's files in it."""
    return manifest.user_metadata.get("written_by") == HF_WRITER and any(
        name in manifest.files for name in HF_MARKER_FILES
    )


def read_native_files(
    storage: Any,
    folder: str,
    manifest: Any,
    *,
    map_location: MapLocation = "cpu",
    include: Callable[[str], bool] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """The Trainer's own files inside one of OUR checkpoint folders, read as :func:`read_hf_folder` reads them.

    ``ckpt_plugins.hf`` commits ``model.safetensors`` (or the adapter's), ``optimizer.pt``,
    ``scheduler.pt``, ``rng_state*.pth`` and ``trainer_state.json`` beside the manifest, which lists
    them with their checksums. A restore of such a folder returns them next to the manifest's own
    state (``data_position``), so ``restore(".../checkpoint-30")`` gives the weights back.

    Args:
        storage: the folder's storage.
        folder: the checkpoint folder.
        manifest: its manifest (``files`` lists the native files with sizes and checksums).
        map_location: device for the tensors.
        include: keep only these key paths (``"model.<name>"``, ...); unselected weights are never read.
        verify: check each native file's size and xxh3 against the manifest before reading it.

    Returns:
        ``{"model": ..., "optimizer": ..., ...}`` for the parts present; ``{}`` unless
        :func:`holds_native_files`, or when the folder is not local (logged).

    Raises:
        CorruptCheckpointError: a native file is missing or fails its checksum (named).
    """
    if not holds_native_files(manifest):
        return {}
    local = storage.local_path(folder)
    if local is None:
        log.warning(
            "%s: the Trainer's files are read from local folders only; returning the manifest's state alone", folder
        )
        return {}
    if verify:
        for name, record in manifest.files.items():
            if _OURS.fullmatch(name):
                continue  # our own tensor files, verified by the core as it reads them
            path = storage.join(folder, name)
            if not storage.exists(path):
                raise CorruptCheckpointError(f"{path}: file listed in the manifest is missing")
            got = checksum_file(storage, path, like=record.xxh3_64)
            if (got.size, got.xxh3_64) != (record.size, record.xxh3_64):
                raise CorruptCheckpointError(
                    f"{path}: size {got.size} / xxh3 {got.xxh3_64} do not match the "
                    f"manifest ({record.size} / {record.xxh3_64}); the file is damaged"
                )
    return _Reader(local, map_location, False, include).read()
