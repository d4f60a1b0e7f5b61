"""``ckpt-plugins``: list, inspect, verify, prune and diff checkpoints from the shell.

Every command reads our format and the foreign ones (Lightning ``.ckpt``, HF ``checkpoint-N/``,
torch ``.pt``/``.bin``, ``.safetensors``). Listing and reading never take the directory's write
lock, so they are safe next to a running training job; ``prune --yes`` does take it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence

import torch

from ckpt_plugins.errors import CheckpointError, CheckpointNotFoundError
from ckpt_plugins.formats import describe, detect_format
from ckpt_plugins.tree.walk import iter_leaves
from ckpt_plugins.restore.read import restore_path
from ckpt_plugins.manager import CheckpointManager
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.layout.naming import parse_step_dir
from ckpt_plugins.tree.codec import unflatten_state
from ckpt_plugins.storage import open_storage
from ckpt_plugins.files.tensor_file import read_header

__all__ = ["main"]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-last", type=int)
    parser.add_argument("--keep-best", type=int)
    parser.add_argument("--monitor")
    parser.add_argument("--mode", default="min", choices=("min", "max"))
    parser.add_argument("--keep-every-n-steps", type=int)
    parser.add_argument("--keep-time-interval", type=float, help="seconds")
    parser.add_argument("--dir-prefix", help="checkpoint folder prefix (default: detected, step_ or checkpoint-)")


def _detect_prefix(directory: str) -> str:
    """``step_`` (ours) unless the folder only holds ``checkpoint-N`` (the HF Trainer layout)."""
    storage, root = open_storage(directory)
    for prefix in ("step_", "checkpoint-"):
        if any(parse_step_dir(name, prefix) is not None for name in storage.listdir(root)):
            return prefix
    return "step_"


def _manager(args: argparse.Namespace, read_only: bool, directory: str | None = None) -> CheckpointManager:
    directory = directory or args.directory
    prefix = getattr(args, "dir_prefix", None) or _detect_prefix(directory)
    return CheckpointManager(directory, keep_last=getattr(args, "keep_last", None),
                             keep_best=getattr(args, "keep_best", None),
                             monitor=getattr(args, "monitor", None), mode=getattr(args, "mode", "min"),
                             keep_every_n_steps=getattr(args, "keep_every_n_steps", None),
                             keep_time_interval=getattr(args, "keep_time_interval", None),
                             read_only=read_only, dir_prefix=prefix)


def _dir_size(storage, path: str) -> int:
    return sum(storage.size(storage.join(path, name)) for name in storage.listdir(path))


def _existing_directory(directory: str) -> None:
    storage, root = open_storage(directory)
    if not storage.isdir(root):
        raise CheckpointNotFoundError(f"{directory}: no such directory; pass the folder that holds "
                                      "the step_N (or checkpoint-N) folders")


def cmd_ls(args: argparse.Namespace) -> int:
    _existing_directory(args.directory)
    mgr = _manager(args, read_only=True)
    records = mgr.records()
    if not records:
        print(f"no committed checkpoints in {args.directory}")
        return 0
    decision = mgr.retention()
    now = time.time()
    rows = [["STEP", "METRICS", "SIZE", "AGE", "KEPT BY"]]
    for rec in records:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in rec.metrics.items()) or "-"
        kept = ",".join(decision.keep.get(rec.step, [])) or "(would be pruned)"
        size = _dir_size(mgr.storage, mgr.path_for(rec.step))
        rows.append([str(rec.step), metrics, _human_bytes(size), _human_age(now - rec.wall_time), kept])
    print(_table(rows))
    return 0


def _describe_ours(path: str) -> list[tuple[str, str, str, int]]:
    """Keys, shapes and dtypes from the manifest and tensor-file headers, without reading data:
    tensors are rebuilt on the meta device from the headers."""
    storage, root = open_storage(path)
    manifest = Layout(storage, root).read_manifest(root)
    rows = []
    for part_name, part in manifest.parts.items():
        placeholders = {}
        if part.tensor_file:
            file_path = storage.join(root, part.tensor_file)
            with storage.open_read(file_path) as f:
                headers, _ = read_header(f, file_path, storage.size(file_path))
            placeholders = {key: torch.empty(shape, dtype=dtype, device="meta")
                            for key, (dtype, shape, _b, _e) in headers.items()}
        state = unflatten_state(part.tree, placeholders)
        prefix = "" if part_name == "state" else f"[{part_name}] "
        rows += [(prefix + k, s, d, b) for k, s, d, b in describe(state)]
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    storage, root = open_storage(args.path)
    fmt = "ckpt_plugins" if storage.exists(storage.join(root, MANIFEST_NAME)) else detect_format(args.path)
    if fmt == "ckpt_plugins":
        manifest = Layout(storage, root).read_manifest(root)
        print(f"{args.path}: ckpt_plugins format {manifest.format_version}, step {manifest.step}, "
              f"world size {manifest.world_size}, metrics {manifest.metrics or '-'}")
        rows = _describe_ours(args.path)
    else:
        state, _ = restore_path(args.path, target=None, selector=None, rename=None, strict=True,
                                map_location="cpu", allow_unsafe_pickle=args.allow_unsafe_pickle,
                                verify=True)
        print(f"{args.path}: {fmt} format")
        rows = describe(state)
    table = [["KEY", "SHAPE", "DTYPE", "BYTES"]] + [[k, s, d, _human_bytes(b) if s else ""] for k, s, d, b in rows]
    print(_table(table))
    total = sum(r[3] for r in rows)
    print(f"{len(rows)} entries, {_human_bytes(total)} of tensors")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage, root = open_storage(args.path)
    if storage.exists(storage.join(root, MANIFEST_NAME)):
        targets = [root]
    elif detect_format(args.path) is None and storage.isdir(root):
        targets = [c.path for c in _manager(args, read_only=True, directory=args.path).layout.committed()]
        if not targets:
            print(f"{args.path}: no committed checkpoints to verify")
            return 1
    else:
        targets = [root]
    damaged = 0
    for target in targets:
        if storage.exists(storage.join(target, MANIFEST_NAME)):
            problems = Layout(storage, root).verify(target)
        else:
            try:
                restore_path(target, target=None, selector=None, rename=None, strict=True,
                             map_location="cpu", allow_unsafe_pickle=False, verify=True)
                problems = []
            except CheckpointError as exc:
                problems = [str(exc)]
        damaged += bool(problems)
        print(f"{'DAMAGED' if problems else 'OK':8} {target}")
        for problem in problems:
            print(f"         {problem}")
    return 1 if damaged else 0


def cmd_prune(args: argparse.Namespace) -> int:
    _existing_directory(args.directory)
    with _manager(args, read_only=not args.yes) as mgr:
        decision = mgr.prune(dry_run=not args.yes)
    for step, reasons in decision.keep.items():
        print(f"keep    step {step} ({', '.join(reasons)})")
    for step in decision.delete:
        print(f"{'deleted' if args.yes else 'delete '} step {step}")
    if decision.delete and not args.yes:
        print("dry run: nothing was deleted; pass --yes to delete")
    return 0


def _load_any(path: str, allow_unsafe_pickle: bool):
    state, _ = restore_path(path, target=None, selector=None, rename=None, strict=True,
                            map_location="cpu", allow_unsafe_pickle=allow_unsafe_pickle, verify=True)
    return state


def cmd_diff(args: argparse.Namespace) -> int:
    a = dict(_leaves(_load_any(args.a, args.allow_unsafe_pickle)))
    b = dict(_leaves(_load_any(args.b, args.allow_unsafe_pickle)))
    lines = []
    lines += [f"- {k} (only in A)" for k in a if k not in b]
    lines += [f"+ {k} (only in B)" for k in b if k not in a]
    for key in (k for k in a if k in b):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                lines.append(f"~ {key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            elif not torch.equal(x, y):
                delta = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else math.nan
                lines.append(f"~ {key}: values differ (max |A-B| = {delta:.3g})")
        elif type(x) is not type(y) or not _plain_equal(x, y):
            lines.append(f"~ {key}: {x!r:.60} vs {y!r:.60}")
    print("\n".join(lines) if lines else "identical")
    return 1 if lines else 0


def _plain_equal(x, y) -> bool:
    try:
        return bool(x == y) or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
    except (TypeError, ValueError):
        return False


def _leaves(state):
    yield from iter_leaves(state)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-plugins", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the library's logs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list committed checkpoints: step, metrics, size, age, which rule keeps it")
    p.add_argument("directory")
    _policy_args(p)
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("inspect", help="keys, shapes, dtypes and bytes of one checkpoint (any format)")
    p.add_argument("path")
    p.add_argument("--allow-unsafe-pickle", action="store_true", help="only for files you trust")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="check checksums of a checkpoint or of every one in a directory")
    p.add_argument("path")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("prune", help="apply retention rules (dry run unless --yes)")
    p.add_argument("directory")
    _policy_args(p)
    p.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("diff", help="keys, shapes and values that differ between two checkpoints")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--allow-unsafe-pickle", action="store_true", help="only for files you trust")
    p.set_defaults(func=cmd_diff)
    from ckpt_plugins.lightning.convert import add_convert_parser  # imports Lightning only when run
    add_convert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"ckpt-plugins {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
