"""Extra files: a framework's native files, committed atomically with a checkpoint.

Adapters use them so the framework can resume from our folders by itself (the HF Trainer reads
``model.safetensors``, ``optimizer.pt``, ``trainer_state.json``...). A value of
``save(..., extra_files={name: value})`` is one of:

* ``bytes``: written as is;
* ``fn(file)``: called on the background writer with a binary file object;
* :class:`TensorFile`: a flat dict of tensors written as a safetensors file;
* :class:`StagedFile`: any nested structure holding tensors and ``write(file, structure)``.

The tensors of the last two are staged exactly like the state (reused host buffers, pinned on
CUDA, overlap mode), so a native file costs the training loop no more than the state does; the
writer then sees the same structure with the staged copies in place of the live tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from ckpt_plugins.tree.walk import map_leaves

__all__ = ["StagedFile", "TensorFile", "collect_tensors", "fill", "fill_tensors"]


@dataclass(frozen=True)
class TensorFile:
    """A flat ``{name: tensor}`` dict written as a safetensors file (``metadata`` in its header)."""

    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StagedFile:
    """Nested ``tree`` whose tensors are staged; ``write(file, staged_tree)`` runs on the writer."""

    tree: Any
    write: Callable[[BinaryIO, Any], None]


@dataclass(frozen=True)
class _Slot:
    index: int


def _skeleton(node: Any, found: list[torch.Tensor]) -> Any:
    """A copy of ``node`` with every tensor replaced by a numbered slot (containers are copied)."""

    def slot(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            found.append(value)
            return _Slot(len(found) - 1)
        return value

    return map_leaves(node, slot)


def collect_tensors(extra_files: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split extra files into tensors to stage (keyed ``extra/<name>/<i>``) and writer specs."""
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, Any] = {}
    for name, value in extra_files.items():
        if isinstance(value, TensorFile):
            keys = list(value.tensors)
            for i, key in enumerate(keys):
                tensors[f"extra/{name}/{i}"] = value.tensors[key]
            specs[name] = ("tensors", keys, dict(value.metadata))
        elif isinstance(value, StagedFile):
            found: list[torch.Tensor] = []
            skeleton = _skeleton(value.tree, found)
            for i, tensor in enumerate(found):
                tensors[f"extra/{name}/{i}"] = tensor
            specs[name] = ("staged", skeleton, len(found), value.write)
        elif isinstance(value, (bytes, bytearray, memoryview)) or callable(value):
            specs[name] = ("plain", value)
        else:
            raise TypeError(
                f"extra_files[{name!r}] must be bytes, a writer function, a TensorFile "
                f"or a StagedFile, got {type(value).__name__}"
            )
    return tensors, specs


def fill_tensors(name: str, count: int, staged: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The staged copies of extra file ``name``'s tensors, in their original order."""
    return [staged[f"extra/{name}/{i}"] for i in range(count)]


def fill(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The structure of a :class:`StagedFile` with its staged tensors in place."""
    return map_leaves(skeleton, lambda value: tensors[value.index] if isinstance(value, _Slot) else value)
