"""Walking nested checkpoint state by dotted key path.

Foreign checkpoints are nests of dicts, lists and tuples with tensors and plain values at the
leaves. Every reader in this package names a leaf the same way: the keys and indices on the way
to it joined with ``"."`` (``"optimizer.state.0.exp_avg"``), so one ``include`` predicate means
the same thing for every format.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["iter_leaves", "join", "select"]


def join(prefix: str, key: object) -> str:
    """Return the key path of ``key`` under ``prefix`` (``""`` is the root)."""
    return f"{prefix}.{key}" if prefix else str(key)


def _children(obj: Any) -> Iterator[tuple[object, Any]] | None:
    if isinstance(obj, Mapping):
        return iter(obj.items())
    if isinstance(obj, (list, tuple)):
        return iter(enumerate(obj))
    return None


def iter_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(key path, value)`` for every leaf of a nest of dicts, lists and tuples.

    Tensors, arrays and plain values are leaves; so is an empty container (so that it still shows
    up in listings).
    """
    children = _children(obj)
    if children is None:
        yield prefix, obj
        return
    empty = True
    for key, value in children:
        empty = False
        yield from iter_leaves(value, join(prefix, key))
    if empty:
        yield prefix, obj


_MISSING = object()


def _select(obj: Any, prefix: str, include: Callable[[str], bool]) -> Any:
    children = _children(obj)
    if children is None or not obj:  # a leaf, or an empty container (a leaf too)
        return obj if include(prefix) else _MISSING
    kept = []
    for key, value in children:
        chosen = _select(value, join(prefix, key), include)
        if chosen is not _MISSING:
            kept.append((key, chosen))
    if not kept:
        return _MISSING
    if isinstance(obj, Mapping):
        return (OrderedDict if isinstance(obj, OrderedDict) else dict)(kept)
    values = [v for _, v in kept]
    return values if isinstance(obj, list) else tuple(values)


def select(obj: Any, include: Callable[[str], bool], prefix: str = "") -> Any:
    """Return a copy of ``obj`` holding only the leaves whose key path satisfies ``include``.

    Containers left empty are dropped; list and tuple items keep their order (so indices after a
    dropped item shift). When nothing is selected the result is an empty dict. Leaves are not
    copied: a memory-mapped tensor that is not selected is simply never touched.
    """
    result = _select(obj, prefix, include)
    return {} if result is _MISSING else result
