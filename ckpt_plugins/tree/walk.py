"""One walker over nested state, by dotted key path.

Training state is a nest of containers with values at the leaves. The same nest comes in two
representations: live Python objects (what ``save()`` is given, what a foreign reader returns:
mappings, lists, tuples) and the encoded JSON tree of :mod:`ckpt_plugins.tree.codec` (tagged
objects for tuples and non-str keys). Every walk in the package goes through the functions here,
so a key path means the same thing everywhere: the keys and indices from the root joined with
``"."`` (``"optimizer.state.0.exp_avg"``), an empty container counts as a leaf, and nesting deeper
than :data:`MAX_DEPTH` is refused (a reference cycle, or hostile input).

The representation is a ``children`` function: ``children(node)`` gives the ``(key, segment,
child)`` triples of a non-empty container and ``None`` for a leaf. :func:`state_children` is the
one for live state; the codec passes its own for encoded trees.

Failures inside a walk raise :class:`TreeFail`, which each level extends with its segment on the
way out, so the caller can name the key path (``dotted(e.keys)``) in its own error type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MISSING",
    "Children",
    "TreeFail",
    "dotted",
    "iter_leaves",
    "join",
    "map_leaves",
    "rebuild_state",
    "segment",
    "select",
    "state_children",
]

MAX_DEPTH = 256  # deeper nesting is refused: real training state is rarely 10 levels deep, and
# this keeps the recursion (up to two frames a level) well inside Python's default limit of 1000

Children = Callable[[Any], "list[tuple[Any, str, Any]] | None"]


class TreeFail(ValueError):
    """A failure deep in a tree; each container level appends its key on the way out.

    Callers turn it into their public error (the codec into UnsupportedStateError or
    CorruptCheckpointError with ``key_path``); uncaught, it still reads as a sentence naming the path.
    """

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.keys: list[Any] = []

    def __str__(self) -> str:
        return f"at key path {dotted(self.keys)!r}: {self.what}" if self.keys else self.what


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""What :func:`select` returns when nothing under a node is kept."""


def segment(key: Any) -> str:
    """The path segment of a dict key or list index."""
    if type(key) is str:
        return key
    try:
        return str(key)
    except ValueError:  # an int beyond Python's int-to-decimal limit
        return f"<int of {key.bit_length()} bits>"


def join(prefix: str, key: Any) -> str:
    """The key path of ``key`` under ``prefix`` (``""`` is the root)."""
    return f"{prefix}.{segment(key)}" if prefix else segment(key)


def dotted(keys: list[Any]) -> str:
    """Key path of ``keys`` given innermost first, as :class:`TreeFail` collects them."""
    return ".".join(segment(k) for k in reversed(keys))


def state_children(node: Any) -> list[tuple[Any, str, Any]] | None:
    """Children of live state: mappings, lists and tuples (namedtuples too); anything else is a leaf."""
    if isinstance(node, Mapping):
        return [(k, segment(k), v) for k, v in node.items()] or None
    if isinstance(node, (list, tuple)):
        return [(i, str(i), v) for i, v in enumerate(node)] or None
    return None


def rebuild_state(node: Any, kept: list[tuple[Any, Any]]) -> Any:
    """A container like the live ``node`` holding ``kept`` ``(key, child)`` pairs: dict subclasses
    keep their type where their constructor allows (``OrderedDict``), namedtuples stay namedtuples."""
    if isinstance(node, Mapping):
        if type(node) is not dict:
            try:
                return type(node)(kept)  # type: ignore[call-arg]
            except TypeError:  # defaultdict, mapping proxies, ...: a plain dict in the same order
                pass
        return dict(kept)
    values = [v for _, v in kept]
    if isinstance(node, list):
        return values
    if hasattr(node, "_fields"):
        return type(node)(*values)
    return tuple(values)


def _child(prefix: str, seg: str, depth: int) -> str:
    # depth, not the prefix, marks the root: the key "" at the root gives "" and its child ".x",
    # exactly as the codec names tensor entries
    return f"{prefix}.{seg}" if prefix or depth else seg


def _descend(node: Any, path: str, depth: int, children: Children) -> list[tuple[Any, str, Any]] | None:
    if depth > MAX_DEPTH:
        raise TreeFail(f"is nested deeper than {MAX_DEPTH} levels (is there a reference cycle?)")
    return children(node)


def iter_leaves(
    node: Any, prefix: str = "", *, children: Children = state_children, _depth: int = 0
) -> Iterator[tuple[str, Any]]:
    """Yield ``(key path, leaf)`` for every leaf under ``node``, in order; an empty container is a leaf.

    Raises:
        TreeFail: nesting deeper than :data:`MAX_DEPTH`, or whatever ``children`` raises; its
            ``keys`` hold the segments from the failing node up.

    Example:
        >>> list(iter_leaves({"a": [1, 2], "b": {}}))
        [('a.0', 1), ('a.1', 2), ('b', {})]
    """
    kids = _descend(node, prefix, _depth, children)
    if kids is None:
        yield prefix, node
        return
    for _key, seg, child in kids:
        try:
            yield from iter_leaves(child, _child(prefix, seg, _depth), children=children, _depth=_depth + 1)
        except TreeFail as e:
            e.keys.append(seg)
            raise


def map_leaves(
    node: Any,
    fn: Callable[[Any], Any],
    *,
    children: Children = state_children,
    rebuild: Callable[[Any, list[tuple[Any, Any]]], Any] = rebuild_state,
    _depth: int = 0,
) -> Any:
    """A copy of ``node`` with ``fn`` applied to every leaf (containers are rebuilt, leaves are not copied).

    Example:
        >>> map_leaves({"a": [1, 2]}, lambda v: v * 10)
        {'a': [10, 20]}
    """
    kids = _descend(node, "", _depth, children)
    if kids is None:
        return fn(node)
    out = []
    for key, seg, child in kids:
        try:
            out.append((key, map_leaves(child, fn, children=children, rebuild=rebuild, _depth=_depth + 1)))
        except TreeFail as e:
            e.keys.append(seg)
            raise
    return rebuild(node, out)


def select(
    node: Any,
    keep: Callable[[str], bool],
    prefix: str = "",
    *,
    children: Children = state_children,
    rebuild: Callable[[Any, list[tuple[Any, Any]]], Any] = rebuild_state,
    empty: Any = MISSING,
) -> Any:
    """``node`` with only the leaves whose key path passes ``keep``, or ``empty`` if none does.

    Containers left empty are dropped; list and tuple items keep their order (later indices shift
    down). Leaves are not copied, so a memory-mapped tensor that is not kept is never read.
    ``prefix`` is the key path of ``node`` itself (for a part of a larger result).

    Example:
        >>> select({"a": 1, "b": {"c": 2}}, lambda p: p.startswith("b."))
        {'b': {'c': 2}}
    """
    out = _select(node, keep, prefix, children, rebuild, 0)
    return empty if out is MISSING else out


def _select(
    node: Any,
    keep: Callable[[str], bool],
    prefix: str,
    children: Children,
    rebuild: Callable[[Any, list[tuple[Any, Any]]], Any],
    depth: int,
) -> Any:
    kids = _descend(node, prefix, depth, children)
    if kids is None:
        return node if keep(prefix) else MISSING
    kept = []
    for key, seg, child in kids:
        try:
            sub = _select(child, keep, _child(prefix, seg, depth), children, rebuild, depth + 1)
        except TreeFail as e:
            e.keys.append(seg)
            raise
        if sub is not MISSING:
            kept.append((key, sub))
    return rebuild(node, kept) if kept else MISSING
