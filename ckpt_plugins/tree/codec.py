"""Flatten nested training state into a strict-JSON tree plus a flat dict of tensors, and back.

No pickle, no eval: :func:`flatten_state` turns dicts, lists, tuples, tensors, numpy values and
plain Python values into a JSON-able ``tree`` and a ``tensors`` dict ready for a safetensors file
(contiguous, no two entries sharing memory); :func:`unflatten_state` validates a tree read from
disk and rebuilds the state. :func:`select_tree` / :func:`rename_tree` edit a tree before a
(partial) restore, and :func:`tensor_refs` says which tensor entries the edited tree still reads.

Key paths are the dict keys (``str(key)`` for non-str keys) and list/tuple indices from the root
joined with ``.`` (``model.layer.0.weight``, ``optimizer.state.0.exp_avg``); every entry must have
its own path. Leaves are tensors, plain values and empty containers.

Tree format (part of the on-disk format; its version lives in the manifest, not here):

* ``str``, ``bool``, ``None``, finite ``float`` and ints in ``[-2**63, 2**64)`` are themselves
  (readers must keep JSON's int/float distinction, as Python's ``json`` does: ``1.0`` is a float).
  A ``list`` is a JSON array. A ``dict`` whose keys are all ``str`` is a JSON object in the same
  order; a key starting with ``$`` is written with one more ``$`` (``"$t"`` -> ``"$$t"``), so the
  key ``"$t"`` never comes from user data and marks a tagged object ``{"$t": TAG, ...}``:

  ===================  ============================================  ==============================
  TAG                  fields                                        value
  ===================  ============================================  ==============================
  tensor               key                                           ``tensors[key]``
  ctensor              key                                           complex tensor, stored as
                                                                     ``torch.view_as_real``
  ndarray              key, dtype (numpy ``dtype.str``), shape       numpy array whose raw bytes
                                                                     are the uint8 ``tensors[key]``
  tuple                v: [values]                                   tuple
  dict                 items: [[key, value], ...]                    dict with a non-str key
  set, frozenset       v: [keys] (sorted when sortable)              set, frozenset
  int                  v: hex digits ("-1f")                         int outside the range above
  float                v: "nan" | "inf" | "-inf"                     non-finite float
  complex              v: [real, imag]                               Python complex
  bytes, bytearray     v: base64                                     bytes, bytearray
  npscalar             dtype, and v (bool/int/float64-or-narrower)   numpy scalar
                       or b64 (raw bytes, every other kind)
  dtype, device, size  v: "float32" / "cuda:0" / [2, 3]              torch.dtype/.device/.Size
  dtensor              key                                           a sharded tensor (DTensor or
                                                                     FSDP1 ShardedTensor):
                                                                     the manifest's ``sharded``
                                                                     entry ``key`` (docs/sharded.md)
  ===================  ============================================  ==============================

  Dict keys (``items``) and set elements are str, int, float, bool, None or tuples of these.

* A tensor ref stores its ``key`` explicitly: the entry's own path where it is stored, or the
  path of an earlier entry it aliases. So :func:`rename_tree` only rewrites dict keys, and the
  renamed tree still reads the original tensor entries.

Behaviour worth knowing:

* Tied weights: tensors with the same storage, offset, shape, stride and dtype are stored once and
  come back as one object (``a is b``). Other views of one storage (``a[0]`` and ``a[1]``) are
  stored as separate copies: values exact, sharing lost (safetensors cannot share memory).
  Non-contiguous tensors are stored as contiguous copies; the device is not recorded.
* ``nn.Parameter`` and tensors with ``requires_grad`` come back as plain tensors (data only).
* ``OrderedDict`` and other dict subclasses come back as plain ``dict`` in the same order
  (``state_dict()._metadata`` is dropped; ``load_state_dict`` does not need it).
* A non-tensor object reached twice (the same list in two places) comes back as two copies.
* Refused with :class:`UnsupportedStateError` naming the key path: functions, classes, arbitrary
  objects, namedtuples, tensor subclasses (DTensor excepted), sparse/quantized/meta tensors, numpy object or
  structured dtypes, and nesting deeper than 256 levels (also refused when reading a tree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError, UnsupportedStateError
from ckpt_plugins.sharded.layout import is_distributed
from ckpt_plugins.tree.tags import (
    TAG,
    TENSOR_TAGS,
    Unflattener,
    children,
    enc_float,
    enc_int,
    enc_key,
    enc_leaf,
    escape,
    rebuild,
    short,
    subscript,
)
from ckpt_plugins.tree.walk import MAX_DEPTH, MISSING, TreeFail, dotted, iter_leaves, segment, select

__all__ = ["FlatState", "flatten_state", "leaf_paths", "rename_tree", "select_tree", "tensor_refs", "unflatten_state"]

_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class FlatState:
    """A flattened state.

    Attributes:
        tree: strict JSON value describing the state (``json.dumps(tree, allow_nan=False)`` works).
        tensors: key path -> tensor, in tree order; contiguous, and no two entries share memory.
        shards: key path -> :class:`~ckpt_plugins.sharded.save.ShardLeaf` of each DTensor (its
            global shape and dtype, and the chunks of it this rank writes).
    """

    tree: Any
    tensors: dict[str, torch.Tensor]
    shards: dict[str, Any] = field(default_factory=dict)
    plain: bool = True
    """False when plain tensors were left out (``flatten_state(plain_tensors=False)``)."""


class _Flattener:
    def __init__(self, plain_tensors: bool = True) -> None:
        self.plain_tensors = plain_tensors
        self.shards: dict[str, Any] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.idents: dict[Any, str] = {}  # storage identity of a view -> the key it is stored under
        self.paths: set[str] = set()
        self.spans: list[tuple[str, int, int, str]] = []  # (device, data_ptr, nbytes, key)

    def enc(self, obj: Any, path: str, depth: int) -> Any:
        tp = type(obj)
        if tp is torch.Tensor or tp is torch.nn.Parameter:
            return self.tensor(obj, path)
        if tp is str or tp is bool or obj is None:
            return obj
        if tp is int:
            return enc_int(obj)
        if tp is float:
            return enc_float(obj)
        if tp is list or tp is tuple or isinstance(obj, dict):
            if depth >= MAX_DEPTH:
                raise TreeFail(f"is nested deeper than {MAX_DEPTH} levels (is there a reference cycle?)")
            if tp is list:
                return self.seq(obj, path, depth)
            if tp is tuple:
                return {TAG: "tuple", "v": self.seq(obj, path, depth)}
            return self.mapping(obj, path, depth)
        if tp is np.ndarray:
            return self.ndarray(obj, path)
        if isinstance(obj, torch.Tensor) and is_distributed(obj):  # DTensor, FSDP1 ShardedTensor
            return self.dtensor(obj, path)
        return enc_leaf(obj)

    def dtensor(self, obj: Any, path: str) -> dict[str, Any]:
        """A DTensor: its chunks go to ``shards`` (the same object twice, tied weights, once)."""
        from ckpt_plugins.sharded.save import shard_leaf

        ident = ("dtensor", id(obj))
        key = self.idents.get(ident)
        if key is None:
            try:
                self.shards[path] = shard_leaf(obj, path)
            except UnsupportedStateError as exc:
                raise TreeFail(str(exc)) from None
            self.idents[ident] = key = path
        return {TAG: "dtensor", "key": key}

    def child(self, seg: str, path: str, depth: int) -> str:
        cpath = seg if depth == 0 else f"{path}.{seg}"
        if cpath in self.paths:
            raise TreeFail(
                "has the same key path as another entry (for example int key 0 and str key "
                "'0' in one dict, or a key containing '.'); rename one of them"
            )
        self.paths.add(cpath)
        return cpath

    def seq(self, obj: list[Any] | tuple[Any, ...], path: str, depth: int) -> list[Any]:
        out = []
        for i, v in enumerate(obj):
            try:
                out.append(self.enc(v, self.child(str(i), path, depth), depth + 1))
            except TreeFail as e:
                e.keys.append(i)
                raise
        return out

    def mapping(self, obj: dict[Any, Any], path: str, depth: int) -> Any:
        if all(type(k) is str for k in obj):
            out: dict[str, Any] = {}
            for k, v in obj.items():
                try:
                    out[escape(k)] = self.enc(v, self.child(k, path, depth), depth + 1)
                except TreeFail as e:
                    e.keys.append(k)
                    raise
            return out
        items = []
        for k, v in obj.items():
            ek = enc_key(k)  # a bad key is reported at this dict's path
            try:
                items.append([ek, self.enc(v, self.child(segment(k), path, depth), depth + 1)])
            except TreeFail as e:
                e.keys.append(k)
                raise
        return {TAG: "dict", "items": items}

    def tensor(self, obj: torch.Tensor, path: str) -> dict[str, Any]:
        if obj.layout is not torch.strided or obj.is_quantized or obj.is_nested or obj.is_meta:
            kind = "meta" if obj.is_meta else "quantized" if obj.is_quantized else str(obj.layout)
            raise TreeFail(
                f"is a {kind} tensor, which cannot be stored; convert it to a dense tensor "
                "with data (for example .to_dense() or .dequantize()) or remove it"
            )
        t = obj.detach() if obj.requires_grad or type(obj) is not torch.Tensor else obj
        if t.is_neg():  # a lazily negated view (complex.conj().imag): store the values it shows
            t = t.resolve_neg()
        tag = "tensor"
        if t.is_complex():
            t, tag = torch.view_as_real(t.resolve_conj()), "ctensor"
        return {TAG: tag, "key": self.add(t, obj, path)}

    def ndarray(self, arr: np.ndarray, path: str) -> dict[str, Any]:
        dt = arr.dtype
        if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise TreeFail(
                f"is a numpy array of dtype {dt}, which cannot be stored without pickle; "
                "remove it from the state or convert it to plain dtypes"
            )
        a = arr if arr.flags.c_contiguous and arr.flags.writeable else np.array(arr, order="C")
        raw = a.reshape(-1).view(np.uint8) if a.nbytes else np.empty(0, np.uint8)
        key = self.add(torch.from_numpy(raw), arr, path)
        return {TAG: "ndarray", "key": key, "dtype": dt.str, "shape": list(arr.shape)}

    def add(self, t: torch.Tensor, obj: Any, path: str) -> str:
        """Store ``t`` under ``path`` unless an identical view is already stored; return its key."""
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes:
            ptr = storage.data_ptr()
            ident: Any = (t.device, ptr, t.storage_offset(), t.shape, t.stride(), t.dtype)
        else:
            ident = id(obj)  # empty storages have no address worth comparing
        key = self.idents.get(ident)
        if key is None:
            self.idents[ident] = key = path
            if not self.plain_tensors:
                return key  # another rank's copy of a replicated tensor: rank 0 writes it
            if not t.is_contiguous():
                t = t.contiguous()  # a fresh storage: shares memory with nothing
            elif nbytes:
                self.spans.append((str(t.device), ptr, nbytes, path))
            self.tensors[path] = t
        return key

    def unshare(self) -> None:
        """Copy every entry whose storage overlaps an earlier (by address) entry's storage."""
        end, device = 0, None
        for dev, ptr, nbytes, key in sorted(self.spans):
            if dev == device and ptr < end:
                self.tensors[key] = self.tensors[key].clone(memory_format=torch.contiguous_format)
                end = max(end, ptr + nbytes)
            else:
                end, device = ptr + nbytes, dev


def flatten_state(state: Any, *, plain_tensors: bool = True) -> FlatState:
    """Split ``state`` into a strict-JSON tree and a flat dict of tensors, without copying data.

    Args:
        state: nested dicts/lists/tuples of tensors, numpy values and plain Python values
            (see the module docstring for the full list).
        plain_tensors: collect plain tensors (False on ranks other than 0, which write only
            their DTensor chunks: plain tensors are replicated and rank 0 writes them).

    Returns:
        A :class:`FlatState`; ``tensors`` keys are key paths and reference the caller's tensors
        (non-contiguous tensors and partially shared storages are copied).

    Raises:
        UnsupportedStateError: something cannot be stored without pickle (a function, an arbitrary
            object, ...) or two entries have the same key path; the message names the key path.

    Example:
        >>> flat = flatten_state({"w": torch.ones(2), "step": 3})
        >>> flat.tree, list(flat.tensors)
        ({'w': {'$t': 'tensor', 'key': 'w'}, 'step': 3}, ['w'])
    """
    flat = _Flattener(plain_tensors)
    try:
        tree = flat.enc(state, "", 0)
    except TreeFail as e:
        where = f"{subscript(e.keys)} (key path {dotted(e.keys)!r})" if e.keys else "state"
        raise UnsupportedStateError(f"{where} {e.what}", key_path=dotted(e.keys) if e.keys else None) from None
    except RecursionError:
        raise UnsupportedStateError(
            "state is nested too deeply to store (beyond Python's recursion limit; is there a reference cycle?)"
        ) from None
    flat.unshare()
    return FlatState(tree, flat.tensors, flat.shards, plain_tensors)


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the state described by ``tree`` (from :func:`flatten_state` or a manifest).

    Args:
        tree: the JSON tree; treated as untrusted and validated.
        tensors: tensor key -> tensor (only the keys the tree refers to are read).

    Returns:
        The nested state; refs to the same tensor key give the same object.

    Raises:
        CorruptCheckpointError: malformed tree, unknown tag, missing or mismatched tensor, or
            nesting deeper than the limit; the message names the key path.
    """
    return _checked(Unflattener(tensors).dec, tree, 0)


def _checked(fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    try:
        return fn(*args, **kwargs)
    except TreeFail as e:
        where = f"at key path {dotted(e.keys)!r}" if e.keys else "at the root"
        raise CorruptCheckpointError(
            f"invalid checkpoint state tree {where}: {e.what}", key_path=dotted(e.keys) if e.keys else None
        ) from None
    except RecursionError:
        raise CorruptCheckpointError("invalid checkpoint state tree: nested too deeply") from None


def tensor_refs(tree: Any) -> dict[str, str]:
    """Key path of every tensor-backed leaf (tensor, complex tensor, numpy array) -> tensor key it reads.

    Example:
        >>> tensor_refs(flatten_state({"a": torch.ones(1), "b": 1}).tree)
        {'a': 'a'}
    """
    return _checked(_tensor_refs, tree)


def _tensor_refs(tree: Any) -> dict[str, str]:
    refs: dict[str, str] = {}
    leaves = iter_leaves(tree, children=children)
    for path, leaf in leaves:
        if type(leaf) is dict and leaf.get(TAG) in TENSOR_TAGS:
            key = leaf.get("key")
            if type(key) is not str:
                fail = TreeFail(f"tensor key must be a string, got {short(key)}")
                fail.keys = [path]  # the joined path reads back as itself through dotted()
                raise fail
            refs[path] = key
    return refs


def leaf_paths(tree: Any) -> list[str]:
    """Key path of every leaf in tree order: tensors, plain values, and empty containers.

    Example:
        >>> leaf_paths(flatten_state({"a": [1, 2], "b": {}}).tree)
        ['a.0', 'a.1', 'b']
    """
    return _checked(lambda t: [path for path, _ in iter_leaves(t, children=children)], tree)


def select_tree(tree: Any, keep: Callable[[str], bool]) -> Any:
    """The tree with only the leaves whose key path passes ``keep``.

    Containers left empty are dropped, except the root, which stays as an empty container of its
    kind (a root that is itself an unkept leaf becomes ``{}``). Dropped list/tuple elements close
    up, so later indices shift down. Tensor refs are unchanged.

    Example:
        >>> select_tree({"a": 1, "b": {"c": 2}}, lambda p: p.startswith("b."))
        {'b': {'c': 2}}
    """
    out = _checked(select, tree, keep, children=children, rebuild=rebuild)
    if out is not MISSING:
        return out
    if _checked(children, tree) is not None:
        return rebuild(tree, [])
    is_empty_container = type(tree) is list or (type(tree) is dict and tree.get(TAG) in (None, "tuple", "dict"))
    return tree if is_empty_container else {}


def rename_tree(tree: Any, mapping: Mapping[str, str]) -> Any:
    """Rename key paths by prefix: ``{"model.": "net."}`` turns ``model.w`` into ``net.w``.

    Each rule applies at the dict key where its old prefix ends (the longest rule wins there;
    rules ending deeper apply too, matched against the original paths). Only ``str`` keys can be
    renamed, and a rule may not move entries between containers: ``new`` must keep the part of the
    path above that key, and when the old prefix covers a whole container key (``"model."``) the
    new one must end with ``.`` too. Tensor refs keep pointing at the original tensor keys.

    Raises:
        ConfigError: a rule is not str -> str, would move entries, rename a non-str key or list
            index, or map two entries to one key path.
        CorruptCheckpointError: the tree is malformed.

    Example:
        >>> rename_tree({"model": {"w": 1}}, {"model.": "net."})
        {'net': {'w': 1}}
    """
    rules = sorted(mapping.items(), key=lambda r: -len(r[0]))
    for old, new in rules:
        if type(old) is not str or type(new) is not str:
            raise ConfigError(f"rename mapping must map str prefixes to str prefixes, got {short(old)}: {short(new)}")
    if not rules:
        return tree
    out = _checked(_rename, tree, "", 0, rules)
    seen: set[str] = set()
    for path in leaf_paths(out):
        if path in seen:
            raise ConfigError(f"rename {dict(mapping)!r} gives two entries the key path {path!r}")
        seen.add(path)
    return out


def _rename(node: Any, path: str, depth: int, rules: list[tuple[str, str]]) -> Any:
    if depth > MAX_DEPTH:
        raise TreeFail(f"is nested deeper than {MAX_DEPTH} levels")
    kids = children(node)
    if kids is None:
        return node
    prefix = "" if depth == 0 else path + "."
    plain = type(node) is dict and TAG not in node
    kept, segs = [], set()
    for key, seg, child in kids:
        full = prefix + seg
        try:
            is_container = children(child) is not None
            deeper = [r for r in rules if len(r[0]) > len(full) + 1 and r[0].startswith(full + ".")]
            sub = _rename(child, full, depth + 1, deeper) if deeper else child
        except TreeFail as e:
            e.keys.append(seg)
            raise
        probe = full + "." if is_container else full
        for old, new in rules:
            if probe.startswith(old):
                key, seg = _renamed_key(key, full, probe, prefix, old, new, is_container, plain)
                break
        if prefix + seg in segs:
            raise ConfigError(f"rename gives two entries the key path {prefix + seg!r}")
        segs.add(prefix + seg)
        kept.append((key, sub))
    return rebuild(node, kept)


def _renamed_key(
    key: Any, full: str, probe: str, prefix: str, old: str, new: str, is_container: bool, plain: bool
) -> tuple[Any, str]:
    rule = f"rename {old!r} -> {new!r}"
    if type(key) is not str:
        raise ConfigError(
            f"{rule} would rename {full!r}, which is a list index or a non-str dict key; only str keys can be renamed"
        )
    if not new.startswith(prefix):
        raise ConfigError(
            f"{rule} would move {full!r} out of its container {prefix[:-1]!r}; renames "
            f"change keys in place, so the new prefix must start with {prefix!r} too"
        )
    seg = new[len(prefix) :] + probe[len(old) :]
    if is_container:
        if not seg.endswith("."):
            raise ConfigError(
                f"{rule} would merge the container {full!r} into its parent; end the new "
                "prefix with '.' like the old one (moving entries between levels is not "
                "supported)"
            )
        seg = seg[:-1]
    return (escape(seg) if plain else seg), seg
