"""``ckpt-plugins verify PATH``: is each checkpoint intact, and safe to load?

Our checkpoints: the manifest parses, and every file it lists is there with its size and xxh3
checksum. Foreign ones: the whole checkpoint is read the way ``restore`` reads it (torch's safe
unpickler for pickles). Each gets one status:

- ``OK``: intact;
- ``DAMAGED``: a file is missing, truncated, or fails its checksum; the manifest is unreadable;
- ``UNSAFE``: a pickle needs a global outside the allow-list (named): loading it would run code.
"""

from __future__ import annotations

import argparse
from typing import Any

from ckpt_plugins.cli.storage import open_path
from ckpt_plugins.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from ckpt_plugins.formats import detect_format, read_foreign
from ckpt_plugins.restore.read import is_our_checkpoint

from . import catalog
from .render import emit_json, progress

__all__ = ["add_parser", "check", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check the checksums (or readability) of a checkpoint or of a run folder's",
        description="Check one checkpoint, or every checkpoint of a run folder, in any format. "
        "Exit status 0 when all are OK, 1 when one is DAMAGED or UNSAFE.",
    )
    p.add_argument("path", help="a checkpoint (folder or file) or a run folder")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.set_defaults(func=run)


def _targets(path: str) -> list[tuple[str, bool]]:
    """(checkpoint path, is ours) for a checkpoint or for every checkpoint of a run folder."""
    storage, root = open_path(path)
    if is_our_checkpoint(storage, root):
        return [(path, True)]
    if not storage.exists(root):
        raise ConfigError(f"{path}: no such file or folder")
    fmt = detect_format(path)
    inner = catalog.run_folder_entries(path)
    own = [(path, False)] if fmt not in (None, "ckpt_plugins") else []  # e.g. a Trainer output_dir's final model
    # our folders are verified against their manifest; our single-file .ckpt, like foreign files, by its reader
    return own + [(e.path, e.format == "ckpt_plugins" and not e.single_file) for e in inner]


def check(path: str, ours: bool, advance: Any = None) -> tuple[str, list[str]]:
    """Status (``OK``, ``DAMAGED``, ``UNSAFE``) and problems of one checkpoint."""
    if ours:
        storage, root = open_path(path)
        problems = catalog.layout_of(storage, root).verify(root, progress=advance)
        return ("DAMAGED" if problems else "OK"), problems
    try:
        read_foreign(path)
    except UnsafeCheckpointError as exc:
        return "UNSAFE", [str(exc)]
    except CheckpointError as exc:
        return "DAMAGED", [str(exc)]
    return "OK", []


def run(args: argparse.Namespace) -> int:
    targets = _targets(args.path)
    if not targets:
        message = f"{args.path}: no checkpoints to verify"
        if args.json:
            emit_json({"path": args.path, "ok": False, "results": [], "error": message})
        else:
            print(message)
        return 1
    sizes = []
    for path, _ in targets:
        storage, root = open_path(path)
        sizes.append(catalog.folder_size(storage, root))
    results = []
    with progress("verifying", sum(sizes), enabled=not args.json) as advance:
        for (path, ours), size in zip(targets, sizes, strict=False):
            status, problems = check(path, ours, advance if ours else None)
            if not ours:
                advance(size)
            results.append({"path": path, "status": status, "problems": problems})
            if not args.json:
                print(f"{status:8} {path}")
                for problem in problems:
                    print(f"         {problem}")
    ok = all(r["status"] == "OK" for r in results)
    if args.json:
        emit_json({"path": args.path, "ok": ok, "results": results})
    return 0 if ok else 1
