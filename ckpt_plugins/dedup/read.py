"""Reading the tensors a dedup manifest refers to, with each tensor's digest checked."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ckpt_plugins.dedup.digest import tensor_digest
from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.manifest import Manifest, Part
from ckpt_plugins.files.tensor_file import read_tensor_file
from ckpt_plugins.layout.shared import SharedPool

__all__ = ["read_shared"]


def read_shared(
    pool: SharedPool,
    manifest: Manifest,
    part: Part,
    keys: Iterable[str] | None,
    *,
    verify: bool,
    map_location: str | torch.device = "cpu",
) -> Mapping[str, torch.Tensor]:
    """The tensors ``keys`` (all when None) of ``part`` that live in shared pool files.

    A pool file holds the tensors one save changed, of which a later checkpoint may use some, so
    it is read by key (size and header checked) and every tensor is checked against the digest
    this manifest recorded for it (``verify``): a damaged shared file fails every checkpoint that
    reads the damaged tensor, naming the file.
    """
    shared = part.shared or {}
    wanted = set(shared) if keys is None else set(keys) & set(shared)
    by_file: dict[str, list[str]] = {}
    for key in wanted:
        by_file.setdefault(shared[key][0], []).append(key)
    out: dict[str, torch.Tensor] = {}
    for name, names in sorted(by_file.items()):
        path = pool.path(name)
        tensors = read_tensor_file(pool.storage, path, keys=names, expected=manifest.shared_files.get(name))
        for key in names:
            tensor = tensors[key]
            if verify and tensor_digest(tensor) != shared[key][1]:
                raise CorruptCheckpointError(
                    f"{path}: tensor {key!r} does not match the digest step {manifest.step} recorded for it; "
                    "the shared file is damaged"
                )
            out[key] = tensor if str(map_location) == "cpu" else tensor.to(map_location)
    return out
