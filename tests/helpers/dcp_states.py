"""Helpers shared by the DCP interop tests: write a DCP folder, compare states bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ckpt_plugins.tree.walk import iter_leaves


def dcp_save(state, path: Path) -> Path:
    """``torch.distributed.checkpoint.save`` in one process, no process group."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": expected
        dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)  # NaN and -0.0 compare by bits


def assert_same(a, b) -> None:
    """The same key paths, bit-identical tensors (dtype included) and equal plain values."""
    left, right = sorted(iter_leaves(a), key=lambda kv: kv[0]), sorted(iter_leaves(b), key=lambda kv: kv[0])
    assert [k for k, _ in left] == [k for k, _ in right]
    for (key, x), (_, y) in zip(left, right, strict=True):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(_bits(x), _bits(y)), key
        else:
            assert x == y and type(x) is type(y), key
