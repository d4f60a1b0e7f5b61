"""``ckpt-plugins inspect PATH``: keys, shapes, dtypes and sizes of one checkpoint, in any format.

Nothing but headers is read where the format allows it: our manifests and tensor-file headers,
safetensors headers (our HF checkpoints' ``model.safetensors`` too), a DCP folder's ``.metadata``;
pickles are memory-mapped, so their tensors are not read either.
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
from typing import Any

import numpy as np
import torch

from ckpt_plugins.cli.storage import open_path
from ckpt_plugins.errors import ConfigError
from ckpt_plugins.files.manifest import Manifest
from ckpt_plugins.files.tensor_file import read_header
from ckpt_plugins.formats import detect_format, read_foreign
from ckpt_plugins.formats.dcp import read_dcp
from ckpt_plugins.formats.hf_folder import holds_native_files, read_hf_folder
from ckpt_plugins.formats.safetensors_file import read_safetensors
from ckpt_plugins.layout.shared import SHARED_DIR
from ckpt_plugins.restore.read import is_our_checkpoint
from ckpt_plugins.tree.codec import unflatten_state
from ckpt_plugins.tree.tags import TAG, TENSOR_TAGS, children, np_dtype
from ckpt_plugins.tree.walk import iter_leaves

from . import catalog
from .render import emit_json, human_bytes, print_table, stdout

__all__ = ["add_parser", "describe_ours", "run"]

Row = tuple[str, "tuple[int, ...] | None", str, int]  # key, shape (None: not an array), dtype, bytes

_COMPLEX = {torch.float16: "complex32", torch.float32: "complex64", torch.float64: "complex128"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="keys, shapes, dtypes and bytes of one checkpoint (any format)",
        description="List every entry of one checkpoint: ours, a Lightning .ckpt, an HF "
        "checkpoint-N folder, a torch .pt/.bin, a .safetensors file or a torch.distributed.checkpoint folder.",
    )
    p.add_argument("path", help="one checkpoint: a folder (step_N, checkpoint-N) or a file (.ckpt, .pt, .safetensors)")
    p.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load pickles with full pickle (can run code: only for files you trust)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run)


def _tree_rows(tree: Any, headers: dict[str, tuple[torch.dtype, list[int]]], prefix: str) -> list[Row]:
    """Rows of one state tree from its JSON description and tensor headers, reading no data."""
    rows: list[Row] = []

    def visit(path: str, leaf: Any) -> None:
        key = prefix + path
        tag = leaf.get(TAG) if type(leaf) is dict else None
        if tag in TENSOR_TAGS:
            if tag == "ndarray":
                dt, dims = np_dtype(leaf["dtype"]), tuple(int(d) for d in leaf["shape"])
                rows.append((key, dims, str(dt), math.prod(dims) * dt.itemsize))
                return
            dtype, shape = headers[leaf["key"]]
            size = math.prod(shape) * dtype.itemsize
            if tag == "ctensor":
                rows.append((key, tuple(shape[:-1]), _COMPLEX.get(dtype, "complex"), size))
            else:
                rows.append((key, tuple(shape), str(dtype).removeprefix("torch."), size))
            return
        value = unflatten_state(leaf, {})
        rows.append((key, None, type(value).__name__, 0))

    for path, leaf in iter_leaves(tree, children=children):
        visit(path, leaf)
    return rows


def _leaf_rows(state: Any, prefix: str = "") -> list[Row]:
    rows: list[Row] = []
    for key, value in iter_leaves(state):
        if isinstance(value, torch.Tensor):
            rows.append(
                (
                    prefix + key,
                    tuple(value.shape),
                    str(value.dtype).removeprefix("torch."),
                    value.numel() * value.element_size(),
                )
            )
        elif isinstance(value, np.ndarray):
            rows.append((prefix + key, tuple(value.shape), str(value.dtype), int(value.nbytes)))
        else:
            rows.append((prefix + key, None, type(value).__name__, 0))
    return rows


def describe_ours(storage: Any, root: str, manifest: Manifest) -> list[Row]:
    """Every entry of one of our checkpoints: each part's tree, then the Trainer's own files of an
    HF checkpoint (weights from safetensors headers; pickles memory-mapped)."""
    rows: list[Row] = []
    for part_name, part in manifest.parts.items():
        headers: dict[str, tuple[torch.dtype, list[int]]] = {}
        if part.tensor_file:
            file_path = storage.join(root, part.tensor_file)
            with storage.open_read(file_path) as f:
                entries, _ = read_header(f, file_path, storage.size(file_path))
            headers = {key: (dtype, list(shape)) for key, (dtype, shape, _b, _e) in entries.items()}
        if manifest.sharded is not None and part_name == "state":  # sharded tensors: global shapes
            headers.update({key: (e.dtype, list(e.shape)) for key, e in manifest.sharded.tensors.items()})
        shared = part.shared or {}
        for name in sorted({n for n, _ in shared.values()}):  # dedup: headers of the pool files
            file_path = storage.join(storage.join(posixpath.dirname(root.rstrip("/")), SHARED_DIR), name)
            with storage.open_read(file_path) as f:
                entries, _ = read_header(f, file_path, storage.size(file_path))
            headers.update(
                {k: (d, list(sh)) for k, (d, sh, _b, _e) in entries.items() if shared.get(k, ("",))[0] == name}
            )
        rows += _tree_rows(part.tree, headers, "" if part_name == "state" else f"[{part_name}] ")
    local = storage.local_path(root)
    if local is not None and holds_native_files(manifest):
        rows += _leaf_rows(read_hf_folder(local, meta=True))
    return rows


def _foreign_state(path: str, fmt: str | None, allow_unsafe_pickle: bool) -> Any:
    if fmt == "safetensors":
        return read_safetensors(path, meta=True)
    if fmt == "hf":
        return read_hf_folder(path, meta=True, allow_unsafe_pickle=allow_unsafe_pickle)
    if fmt == "dcp":
        return read_dcp(path, meta=True, allow_unsafe_pickle=allow_unsafe_pickle)
    return read_foreign(path, allow_unsafe_pickle=allow_unsafe_pickle)


RUN_LIMIT = 8
"""Longer runs of plain values in one list (Python's RNG state: 625 ints) show as one table row."""


def _collapse(rows: list[Row]) -> list[Row]:
    """Fold runs of more than :data:`RUN_LIMIT` plain items of one list into ``key[0..n]`` rows."""
    out: list[Row] = []
    i = 0
    while i < len(rows):
        key, shape, dtype, _ = rows[i]
        parent, _, index = key.rpartition(".")
        j = i
        while (
            j < len(rows)
            and rows[j][1] is None
            and rows[j][2] == dtype
            and index.isdigit()
            and rows[j][0] == f"{parent}.{int(index) + j - i}"
        ):
            j += 1
        if shape is None and j - i > RUN_LIMIT:
            out.append((f"{parent}.[{index}..{int(index) + j - i - 1}]", None, f"{j - i} x {dtype}", 0))
            i = j
        else:
            out.append(rows[i])
            i += 1
    return out


def _refuse_run_folder(path: str) -> None:
    """``inspect`` takes one checkpoint; on a run folder say which ones it holds and point to ls."""
    entries = catalog.scan(path)
    if not entries:
        raise ConfigError(
            f"{path} holds no checkpoint that ckpt-plugins can read (our folders, .ckpt, "
            "checkpoint-N, .pt/.bin, .safetensors); pass one checkpoint"
        )
    names = ", ".join(e.name for e in entries[-3:])
    raise ConfigError(
        f"{path} is a run folder with {len(entries)} checkpoint(s) ({names}); inspect reads one "
        f"checkpoint, e.g. `ckpt-plugins inspect {os.path.join(path, entries[-1].name)}`; "
        f"list them with `ckpt-plugins ls {path}`"
    )


def run(args: argparse.Namespace) -> int:
    storage, root = open_path(args.path)
    info: dict[str, Any]
    if is_our_checkpoint(storage, root):
        manifest = catalog.layout_of(storage, root).read_manifest(root)
        rows = describe_ours(storage, root, manifest)
        info = {
            "format": "ckpt_plugins",
            "format_version": manifest.format_version,
            "step": manifest.step,
            "world_size": manifest.world_size,
            "metrics": manifest.metrics,
        }
    else:
        if not storage.exists(root):
            raise ConfigError(f"{args.path}: no such file or folder")
        fmt = detect_format(args.path)
        if fmt is None and storage.isdir(root):
            _refuse_run_folder(args.path)
        rows = _leaf_rows(_foreign_state(args.path, fmt, args.allow_unsafe_pickle))
        info = {"format": fmt, "step": None, "metrics": {}}
    total = sum(r[3] for r in rows)
    if args.json:
        emit_json(
            {
                "path": args.path,
                **info,
                "total_bytes": total,
                "entries": [
                    {"key": k, "shape": list(s) if s is not None else None, "dtype": d, "bytes": b}
                    for k, s, d, b in rows
                ],
            }
        )
        return 0
    console = stdout()
    if info["format"] == "ckpt_plugins":
        metrics = " ".join(f"{k}={v:.4g}" for k, v in info["metrics"].items()) or "-"
        console.print(
            f"{args.path}: ckpt_plugins format {info['format_version']}, step {info['step']}, "
            f"world size {info['world_size']}, metrics {metrics}"
        )
    else:
        console.print(f"{args.path}: {info['format']} format")
    print_table(
        ["KEY", "SHAPE", "DTYPE", "BYTES"],
        [
            [k, str(s) if s is not None else "", d, human_bytes(b) if s is not None else ""]
            for k, s, d, b in _collapse(rows)
        ],
        fold=("KEY",),
        console=console,
    )
    console.print(f"{len(rows)} entries, {human_bytes(total)} of tensors")
    return 0
