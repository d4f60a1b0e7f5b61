"""``ckpt-plugins ls DIR`` and ``ckpt-plugins prune DIR``: the checkpoints of a run folder and
which retention rule keeps each one.

The rules are the run's own (stored in its manifests) unless rule flags are given, which then
replace them: ``ls --keep-last 2`` shows what ``prune --keep-last 2 --yes`` would delete.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ckpt_plugins.cli.storage import open_path
from ckpt_plugins.errors import ConfigError
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.layout.lock import DirectoryLock

from . import catalog
from .render import emit_json, human_age, human_bytes, print_table, stdout

__all__ = ["add_parsers", "run_ls", "run_prune"]


# rule option names as the command line spells them (keep_best -> --keep-best), for errors
FLAG_NAMES = {name: "--" + name.replace("_", "-") for name in catalog.RULE_FLAGS}


def _rule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retention rules (default: the rules the run stored in its manifests)")
    g.add_argument("--keep-last", type=int, metavar="N", help="keep the N most recent checkpoints")
    g.add_argument("--keep-best", type=int, metavar="N", help="keep the N best by --monitor")
    g.add_argument("--monitor", metavar="METRIC", help="the metric that ranks checkpoints (e.g. val_loss)")
    g.add_argument("--mode", choices=("min", "max"), help="min: lower --monitor is better (default); max: higher")
    g.add_argument("--keep-every-n-steps", type=int, metavar="N", help="keep steps divisible by N for good")
    g.add_argument(
        "--keep-time-interval",
        type=float,
        metavar="SECONDS",
        help="keep the first checkpoint of each interval of this many seconds",
    )
    p.add_argument(
        "--dir-prefix",
        metavar="PREFIX",
        help="only checkpoints whose name starts with PREFIX (e.g. step_ or checkpoint-)",
    )


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "ls",
        help="list the checkpoints of a run folder: step, metrics, size, age, which rule keeps it",
        description="List every checkpoint of a run folder (ours, Lightning .ckpt files, Trainer "
        "checkpoint-N folders, torch and safetensors files).",
    )
    p.add_argument("directory", help="the run folder")
    _rule_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run_ls)
    p = sub.add_parser(
        "prune",
        help="apply retention rules to a run folder (a dry run unless --yes)",
        description="Delete the checkpoints the retention rules do not keep. Named checkpoints "
        "(no step in the name, e.g. last.ckpt) are never deleted.",
    )
    p.add_argument("directory", help="the run folder")
    _rule_args(p)
    p.add_argument("--yes", action="store_true", help="really delete (takes the folder's write lock)")
    p.set_defaults(func=run_prune)


def _listing(args: argparse.Namespace) -> tuple[list[catalog.Entry], dict | None, str, dict[str, list[str] | None]]:
    entries = catalog.scan(args.directory, args.dir_prefix)
    rules, source = catalog.choose_rules(entries, catalog.rule_flags(args))
    reasons: dict[str, list[str] | None] = {e.name: None for e in entries}
    try:
        if rules is not None:
            reasons = catalog.decide(entries, rules)
    except ConfigError as exc:
        if source != "command line":
            raise ConfigError(f"the retention rules {source} are invalid ({exc}); pass rule flags instead") from None
        raise exc.renamed(FLAG_NAMES) from None
    return entries, rules, source, reasons


def _kept_by(entry: catalog.Entry, reasons: list[str] | None) -> str:
    text = "-" if reasons is None else (",".join(reasons) or "(would be pruned)")
    return f"DAMAGED; {text}" if entry.damaged else text


def run_ls(args: argparse.Namespace) -> int:
    entries, rules, source, reasons = _listing(args)
    memory = catalog.memory_snapshots(args.directory) if "://" not in args.directory else []
    now = time.time()
    if args.json:
        emit_json(
            {
                "directory": args.directory,
                "rules": rules,
                "rules_source": source,
                "checkpoints": [
                    {
                        "name": e.name,
                        "path": e.path,
                        "step": e.step,
                        "format": e.format,
                        "kind": e.kind or None,
                        "metrics": e.metrics,
                        "size_bytes": e.size,
                        "wall_time": e.wall_time,
                        "age_s": None if e.wall_time is None else now - e.wall_time,
                        "kept_by": reasons[e.name],
                        "would_prune": reasons[e.name] == [],
                        "damaged": e.damaged,
                    }
                    for e in entries
                ],
                "memory": [
                    {
                        "name": e.name,
                        "path": e.path,
                        "step": e.step,
                        "kind": e.kind,
                        "size_bytes": e.size,
                        "wall_time": e.wall_time,
                        "damaged": e.damaged,
                    }
                    for e in memory
                ],
            }
        )
        return 0
    console = stdout()
    if not entries and not memory:
        console.print(f"no checkpoints in {args.directory}")
        return 0
    rows = []
    for e in entries:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in e.metrics.items()) or "-"
        age = None if e.wall_time is None else now - e.wall_time
        rows.append(
            [
                str(e.step) if e.step is not None else "-",
                e.name,
                e.format,
                metrics,
                human_bytes(e.size),
                human_age(age),
                _kept_by(e, reasons[e.name]),
            ]
        )
    for e in memory:  # the in-memory tier's snapshots (docs/memory_tier.md)
        age = None if e.wall_time is None else now - e.wall_time
        rows.append([str(e.step), e.name, e.kind, "-", human_bytes(e.size), human_age(age), "memory (newest kept)"])
    print_table(
        ["STEP", "NAME", "FORMAT", "METRICS", "SIZE", "AGE", "KEPT BY"], rows, fold=("METRICS",), console=console
    )
    if rules is None:
        print("rules unknown (no manifest stored them); pass --keep-last/--keep-best/... to see what prune would keep")
    else:
        print(f"rules: {catalog.describe_rules(rules)} ({source})")
    for e in entries:
        if e.damaged:
            print(f"DAMAGED {e.name}: {e.damaged}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    entries, rules, source, reasons = _listing(args)
    if rules is None:
        raise ConfigError(
            f"{args.directory}: no retention rules stored in its manifests; pass them, e.g. "
            "--keep-last 3 (see ckpt-plugins prune --help)"
        )
    doomed = [e for e in entries if reasons[e.name] == []]
    storage, root = open_path(args.directory)
    lock = DirectoryLock(storage, root) if args.yes and doomed else None
    if lock is not None:
        lock.acquire()  # a training job writing here holds it: prune refuses instead of racing it
    try:
        print(f"rules: {catalog.describe_rules(rules)} ({source})")
        for e in entries:
            kept = reasons[e.name]
            if kept:
                print(f"keep    step {e.step if e.step is not None else '-'} {e.name} ({', '.join(kept)})")
        layout = Layout(storage, root)
        for e in doomed:
            if args.yes:
                layout.delete_path(storage.join(root, e.name))
            print(f"{'deleted' if args.yes else 'delete '} step {e.step} {e.name}")
    finally:
        if lock is not None:
            lock.release()
    if doomed and not args.yes:
        print("dry run: nothing was deleted; pass --yes to delete")
    return 0
