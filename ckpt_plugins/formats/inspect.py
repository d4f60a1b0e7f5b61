"""A flat listing of nested checkpoint state, for ``ckpt-plugins inspect``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ckpt_plugins.tree.walk import iter_leaves

__all__ = ["describe"]


def describe(obj: Any) -> list[tuple[str, str, str, int]]:
    """Return ``(key path, shape, dtype, nbytes)`` for every leaf of a nested structure.

    Dicts, lists and tuples are walked; key paths join keys and indices with ``"."``. Tensors
    and numpy arrays give their shape as a tuple string, their dtype without the ``torch.``
    prefix, and their size in bytes. Any other leaf (numbers, strings, ``None``, an empty
    container) gives shape ``""``, its Python type name as dtype, and 0 bytes.

    Example:
        >>> describe({"w": torch.zeros(2, 3), "step": 7, "groups": [{"lr": 0.1}]})
        [('w', '(2, 3)', 'float32', 24), ('step', '', 'int', 0), ('groups.0.lr', '', 'float', 0)]
    """
    rows: list[tuple[str, str, str, int]] = []
    for path, value in iter_leaves(obj):
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            nbytes = value.numel() * value.element_size()
            rows.append((path, str(tuple(value.shape)), dtype, nbytes))
        elif isinstance(value, np.ndarray):
            rows.append((path, str(tuple(value.shape)), str(value.dtype), int(value.nbytes)))
        else:
            rows.append((path, "", type(value).__name__, 0))
    return rows
