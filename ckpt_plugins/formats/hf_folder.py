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
from ckpt_plugins.formats._pickle import MapLocation, load_pickle
from ckpt_plugins.tree.walk import join, select
from ckpt_plugins.formats.safetensors_file import read_safetensors

__all__ = ["HF_MARKER_FILES", "read_hf_folder"]

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


class _Reader:
    """Reads the files of one folder with one set of options."""

    def __init__(
        self,
        folder: str,
        map_location: MapLocation,
        allow_unsafe: bool,
        include: Callable[[str], bool] | None,
    ) -> None:
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
                path, map_location=self.map_location, include=self.include, prefix=prefix
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
            out["trainer_state"] = state if self.include is None else select(
                state, self.include, "trainer_state", empty={}
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
) -> dict[str, Any]:
    """Read an HF checkpoint folder into ``{"model": ..., "optimizer": ..., ...}``.

    Args:
        path: the folder (``checkpoint-N`` or a ``save_pretrained`` folder).
        map_location: device for tensors (a device string for safetensors files).
        allow_unsafe_pickle: use full pickle for the ``.pt``/``.pth``/``.bin`` files.
        include: keep only leaves whose key path (``"model.<tensor name>"``,
            ``"optimizer.state.0.exp_avg"``, ...) satisfies it; safetensors weights that are not
            selected are never read.

    Returns:
        A dict with the keys described in this module's docstring, for the parts present.

    Raises:
        UnsafeCheckpointError: a pickle file needs globals outside the allow-list (named).
        CorruptCheckpointError: a file is truncated, unreadable, or missing from its index.
    """
    return _Reader(os.fspath(path), map_location, allow_unsafe_pickle, include).read()
