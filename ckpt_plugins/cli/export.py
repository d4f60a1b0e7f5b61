"""``ckpt-plugins export SRC DST``: a self-contained copy of one checkpoint.

Checkpoints saved with ``dedup=True`` read unchanged tensors from the run directory's shared pool
(``.shared/``); their folders are not complete on their own. ``export`` writes a checkpoint folder
``DST`` holding every byte it needs (``convert`` output is self-contained too: it reads through
the references). SRC is one checkpoint or a run folder (its newest, or ``--step``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ckpt_plugins.errors import ConfigError

from . import catalog
from .convert import resolve_source
from .render import progress

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a self-contained copy of a checkpoint (dedup references resolved)",
        description="Copy one checkpoint (or a run folder's newest, or --step) into a new folder that "
        "holds every byte it needs.",
    )
    p.add_argument("src", help="one of our checkpoints, or a run folder")
    p.add_argument("dst", help="the checkpoint folder to create (must not exist)")
    p.add_argument("--step", type=int, metavar="N", help="with a run folder: export step N (default: the newest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ckpt_plugins.dedup.export import export_checkpoint
    from ckpt_plugins.restore.read import is_our_checkpoint
    from ckpt_plugins.storage import open_storage

    source = resolve_source(args.src, args.step)
    path = source.path if isinstance(source, catalog.Entry) else source
    storage, root = open_storage(path)
    if not is_our_checkpoint(storage, root):
        raise ConfigError(f"{path} is not a ckpt_plugins checkpoint folder; use convert for other formats")
    with progress(f"exporting {path.rstrip('/').rsplit('/', 1)[-1]}", None):
        manifest = export_checkpoint(path, args.dst)
    print(f"wrote {args.dst} (step {manifest.step}, self-contained) from {path}")
    return 0
