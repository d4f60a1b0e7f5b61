"""``ckpt-plugins diff A B``: keys, shapes, dtypes and values that differ between two checkpoints.

Any two formats compare (ours against a ``.pt``, an HF checkpoint against a Lightning one): both
are read the way ``restore`` reads them, and compared leaf by leaf by key path. Exit status 0
when identical, 1 when they differ.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch

from ckpt_plugins.cli.storage import options
from ckpt_plugins.restore.read import restore_path
from ckpt_plugins.tree.walk import iter_leaves

from .render import emit_json, progress

__all__ = ["add_parser", "compare", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "diff",
        help="keys, shapes and values that differ between two checkpoints (any formats)",
        description="Compare two checkpoints leaf by leaf. Exit status 0 when identical, 1 when they differ.",
    )
    p.add_argument("a", help="the first checkpoint (A)")
    p.add_argument("b", help="the second checkpoint (B)")
    p.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load pickles with full pickle (can run code: only for files you trust)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.set_defaults(func=run)


def _load(path: str, allow_unsafe_pickle: bool) -> dict[str, Any]:
    state, _ = restore_path(
        path,
        target=None,
        selector=None,
        rename=None,
        strict=True,
        map_location="cpu",
        allow_unsafe_pickle=allow_unsafe_pickle,
        verify=True,
        storage_options=options(),
    )
    return dict(iter_leaves(state))


def _short(value: Any) -> Any:
    """A JSON-able, short form of a plain value."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value if not isinstance(value, str) or len(value) <= 200 else value[:197] + "..."
    return repr(value)[:200]


def _plain_equal(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (
            isinstance(x, np.ndarray)
            and isinstance(y, np.ndarray)
            and x.shape == y.shape
            and x.dtype == y.dtype
            and bool(np.array_equal(x, y))
        )
    try:
        return bool(x == y) or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
    except (TypeError, ValueError, RuntimeError):
        return False


def compare(a: dict[str, Any], b: dict[str, Any], advance: Any = None) -> list[dict[str, Any]]:
    """Differences between two ``{key path: leaf}`` dicts, A's keys first."""
    out: list[dict[str, Any]] = [{"key": k, "change": "only_in_a"} for k in a if k not in b]
    out += [{"key": k, "change": "only_in_b"} for k in b if k not in a]
    for key in (k for k in a if k in b):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                out.append({"key": key, "change": "shape", "a": list(x.shape), "b": list(y.shape)})
            elif x.dtype != y.dtype:
                out.append(
                    {
                        "key": key,
                        "change": "dtype",
                        "a": str(x.dtype).removeprefix("torch."),
                        "b": str(y.dtype).removeprefix("torch."),
                    }
                )
            elif not torch.equal(x, y):
                delta = (x.double() - y.double()).abs().max().item() if x.is_floating_point() and x.numel() else None
                out.append({"key": key, "change": "values", "max_abs_diff": delta})
        elif type(x) is not type(y) or not _plain_equal(x, y):
            out.append({"key": key, "change": "value", "a": _short(x), "b": _short(y)})
        if advance is not None:
            advance(1)
    return out


def _line(d: dict[str, Any]) -> str:
    key, change = d["key"], d["change"]
    if change == "only_in_a":
        return f"- {key} (only in A)"
    if change == "only_in_b":
        return f"+ {key} (only in B)"
    if change in ("shape", "dtype"):
        return f"~ {key}: {change} {d['a']} vs {d['b']}"
    if change == "values":
        delta = d["max_abs_diff"]
        return f"~ {key}: values differ" + (f" (max |A-B| = {delta:.3g})" if delta is not None else "")
    return f"~ {key}: {str(d['a'])[:60]} vs {str(d['b'])[:60]}"


def run(args: argparse.Namespace) -> int:
    with progress("reading", 2, enabled=not args.json) as advance:
        a = _load(args.a, args.allow_unsafe_pickle)
        advance(1)
        b = _load(args.b, args.allow_unsafe_pickle)
        advance(1)
    with progress("comparing", sum(1 for k in a if k in b), enabled=not args.json) as advance:
        differences = compare(a, b, advance)
    if args.json:
        emit_json({"a": args.a, "b": args.b, "identical": not differences, "differences": differences})
    else:
        print("\n".join(_line(d) for d in differences) if differences else "identical")
    return 1 if differences else 0
