"""Tagged JSON values of the state tree: leaf encoders, the validating decoder, and the tree's
``children``/``rebuild`` views for the walker (:mod:`ckpt_plugins.tree.walk`).

Private helpers of :mod:`ckpt_plugins.tree.codec`, whose module docstring is the format spec.
Encoding of containers and tensors (aliasing, contiguity) lives in ``state_tree``; decoding lives
here, because it is mostly validation of tags. Failures raise :class:`TreeFail`, which each
container level extends with its key, and ``state_tree`` turns into the public error.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckpt_plugins.tree.walk import MAX_DEPTH, TreeFail, segment

TAG = "$t"  # the reserved key of a tagged object; user keys starting with "$" get one more "$"
INT_MIN, INT_MAX = -(2**63), 2**64  # ints outside [INT_MIN, INT_MAX) are tagged as hex strings
DIM_LIMIT = 2**63  # array and Size dimensions must be below this
TENSOR_TAGS = frozenset({"tensor", "ctensor", "ndarray", "dtensor"})
NO_PICKLE = "which cannot be stored without pickle; remove it from the state or convert it to plain values"

_COMPLEX_PARTS = (torch.float16, torch.float32, torch.float64)
_FLOAT_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).split(".", 1)[1]: d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
_FIELDS = {
    "tensor": ("key",),
    "ctensor": ("key",),
    "dtensor": ("key",),
    "ndarray": ("key", "dtype", "shape"),
    "tuple": ("v",),
    "set": ("v",),
    "frozenset": ("v",),
    "dict": ("items",),
    "int": ("v",),
    "float": ("v",),
    "complex": ("v",),
    "bytes": ("v",),
    "bytearray": ("v",),
    "dtype": ("v",),
    "device": ("v",),
    "size": ("v",),
}


def subscript(keys: list[Any]) -> str:
    return "state" + "".join(f"[{short(k)}]" for k in reversed(keys))


def short(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, safe for any value (huge ints, odd reprs)."""
    try:
        text = repr(v)
    except Exception:  # a message must not fail on a value's own repr
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def escape(key: str) -> str:
    return "$" + key if key[:1] == "$" else key


def unescape(key: Any) -> str:
    if type(key) is not str:
        raise TreeFail(f"object key {short(key)} is not a string")
    if key[:1] != "$":
        return key
    if key[:2] != "$$":
        raise TreeFail(f"object key {key!r} starts with a single '$' (reserved for tags)")
    return key[1:]


def enc_int(v: int) -> Any:
    return v if INT_MIN <= v < INT_MAX else {TAG: "int", "v": format(v, "x")}


def enc_float(v: float) -> Any:
    if math.isfinite(v):
        return v
    return {TAG: "float", "v": "nan" if v != v else ("inf" if v > 0 else "-inf")}


def enc_key(k: Any, depth: int = 0) -> Any:
    """Encode a dict key or set element: str, int, float, bool, None, or a tuple of these."""
    tp = type(k)
    if tp is str or tp is bool or k is None:
        return k
    if tp is int:
        return enc_int(k)
    if tp is float:
        return enc_float(k)
    if tp is tuple and depth < 16:
        return {TAG: "tuple", "v": [enc_key(x, depth + 1) for x in k]}
    raise TreeFail(
        f"has the key or set element {short(k)} of type {tp.__qualname__}; keys must be str, int, "
        "float, bool, None or tuples of these"
    )


def check_fields(node: dict[str, Any], tag: str) -> None:
    fields = _FIELDS.get(tag)
    if fields is None:
        raise TreeFail(f"unknown tag {tag!r}")
    if len(node) != len(fields) + 1 or any(f not in node for f in fields):
        raise TreeFail(f"tag {tag!r} needs exactly the fields {list(fields)}, got {short(list(node))}")


def dec_key(node: Any, depth: int = 0) -> Any:
    """Decode a key or set element encoded by :func:`enc_key` (always hashable)."""
    tp = type(node)
    if tp is str or tp is bool or node is None or tp is int or tp is float:
        return node
    if tp is dict and type(node.get(TAG)) is str and depth < 16:
        tag = node[TAG]
        check_fields(node, tag)
        if tag == "tuple":
            return tuple(dec_key(x, depth + 1) for x in _list(node["v"]))
        if tag in ("int", "float"):
            return dec_leaf(node, tag)
    raise TreeFail(f"invalid dict key or set element {short(node)}")


def _list(v: Any) -> list[Any]:
    if type(v) is not list:
        raise TreeFail(f"expected a list, got {type(v).__name__}")
    return v


def _str(v: Any, limit: int = 64) -> str:
    if type(v) is not str or len(v) > limit:
        raise TreeFail(f"expected a string of at most {limit} characters, got {short(v)}")
    return v


def _b64(v: Any) -> bytes:
    try:
        return base64.b64decode(_str(v, 1 << 40), validate=True)
    except (binascii.Error, ValueError) as e:
        raise TreeFail(f"invalid base64 data ({e})") from None


def np_dtype(v: Any) -> np.dtype:
    """A numpy dtype from its ``dtype.str``, refusing object, structured and sub-array dtypes."""
    try:
        dt = np.dtype(_str(v))
    except (TypeError, ValueError) as e:
        raise TreeFail(f"invalid numpy dtype {v!r} ({e})") from None
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise TreeFail(f"numpy dtype {v!r} is not a plain (non-object, non-structured) dtype")
    return dt


def shape_list(v: Any) -> list[int]:
    dims = _list(v)
    if len(dims) > 64 or any(type(d) is not int or not 0 <= d < DIM_LIMIT for d in dims):
        raise TreeFail(f"invalid shape {short(v)}")
    return dims


def _np_scalar(obj: np.generic) -> Any:
    dt = obj.dtype
    if dt.hasobject or dt.fields is not None:
        raise TreeFail(f"is a numpy scalar of dtype {dt}, {NO_PICKLE}")
    node: dict[str, Any] = {TAG: "npscalar", "dtype": dt.str}
    if dt.kind == "b":
        node["v"] = bool(obj)
    elif dt.kind in "iu":
        node["v"] = int(obj)
    elif dt.kind == "f" and dt.itemsize <= 8:
        node["v"] = enc_float(float(obj))
    else:  # complex, long double, datetime, str, bytes, void: exact raw bytes
        node["b64"] = base64.b64encode(obj.tobytes()).decode("ascii")
    return node


def _dec_np_scalar(node: dict[str, Any]) -> np.generic:
    if len(node) != 3 or "dtype" not in node or ("v" in node) == ("b64" in node):
        raise TreeFail(f"tag 'npscalar' needs the fields dtype and one of v/b64, got {short(list(node))}")
    dt = np_dtype(node["dtype"])
    if "b64" in node:
        raw = _b64(node["b64"])
        if len(raw) != dt.itemsize:
            raise TreeFail(f"numpy scalar of dtype {dt.str} needs {dt.itemsize} bytes, got {len(raw)}")
        scalar: np.generic = np.frombuffer(raw, dt)[0] if raw else np.zeros(1, dt)[0]
        return scalar
    v = node["v"]
    ok = {"b": type(v) is bool, "i": type(v) is int, "u": type(v) is int}.get(dt.kind)
    if dt.kind == "f" and dt.itemsize <= 8:
        ok = type(v) is float or (type(v) is dict and v.get(TAG) == "float")
        v = dec_leaf(v, "float") if type(v) is dict else v
    if not ok:
        raise TreeFail(f"invalid value {short(v)} for a numpy scalar of dtype {dt.str}")
    try:
        value: np.generic = dt.type(v)
    except (OverflowError, ValueError) as e:
        raise TreeFail(f"invalid value {short(v)} for numpy dtype {dt.str} ({e})") from None
    return value


def _kind_of(obj: Any) -> tuple[str, str]:
    """What ``obj`` is, and a hint on converting it, for the error message."""
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)):
        return "a function", ""
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}", ""
    if isinstance(obj, torch.Tensor):
        return f"a tensor subclass ({type(obj).__qualname__})", " (a plain torch.Tensor can be stored)"
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return f"a namedtuple ({type(obj).__qualname__})", " (._asdict() gives a dict that can be stored)"
    return f"an object of type {type(obj).__module__}.{type(obj).__qualname__}", ""


def enc_leaf(obj: Any) -> Any:
    """Encode a non-container, non-tensor value that JSON cannot hold as is; TreeFail if impossible."""
    tp = type(obj)
    if isinstance(obj, np.generic):
        return _np_scalar(obj)
    if tp is torch.dtype:
        return {TAG: "dtype", "v": str(obj).split(".", 1)[1]}
    if tp is torch.device:
        return {TAG: "device", "v": str(obj)}
    if tp is torch.Size:
        return {TAG: "size", "v": list(obj)}
    if tp is bytes or tp is bytearray:
        return {TAG: tp.__name__, "v": base64.b64encode(obj).decode("ascii")}
    if tp is complex:
        return {TAG: "complex", "v": [enc_float(obj.real), enc_float(obj.imag)]}
    if tp is set or tp is frozenset:
        items = list(obj)
        try:
            items.sort()  # deterministic trees (and checksums) for sortable sets
        except TypeError:
            pass
        return {TAG: tp.__name__, "v": [enc_key(x) for x in items]}
    kind, hint = _kind_of(obj)
    raise TreeFail(f"is {kind}, {NO_PICKLE}{hint}")


def dec_leaf(node: dict[str, Any], tag: str) -> Any:
    """Decode a tagged leaf that needs no tensors; containers and tensor tags are not handled here."""
    if tag == "npscalar":
        return _dec_np_scalar(node)
    check_fields(node, tag)
    v = node["v"]
    if tag == "float":
        if type(v) is not str or v not in _FLOAT_NAMES:
            raise TreeFail(f"invalid float tag value {short(v)}")
        return _FLOAT_NAMES[v]
    if tag == "int":
        s = _str(v, 1 << 20)
        if not re.fullmatch("-?[0-9a-f]+", s):
            raise TreeFail(f"invalid hex integer {short(v)}")
        return int(s, 16)
    if tag in ("bytes", "bytearray"):
        return _b64(v) if tag == "bytes" else bytearray(_b64(v))
    if tag == "complex":
        parts = _list(v)
        if len(parts) != 2:
            raise TreeFail(f"complex needs [real, imag], got {short(v)}")
        re_im = [dec_leaf(p, "float") if type(p) is dict else p for p in parts]
        if any(type(p) is not float for p in re_im):
            raise TreeFail(f"complex needs two floats, got {short(v)}")
        return complex(*re_im)
    if tag in ("set", "frozenset"):
        elems = [dec_key(x) for x in _list(v)]
        return set(elems) if tag == "set" else frozenset(elems)
    if tag == "dtype":
        dt = TORCH_DTYPES.get(_str(v))
        if dt is None:
            raise TreeFail(f"unknown torch dtype {v!r}")
        return dt
    if tag == "device":
        try:
            return torch.device(_str(v))
        except (RuntimeError, ValueError) as e:
            raise TreeFail(f"invalid torch device {v!r} ({e})") from None
    if tag == "size":
        try:
            return torch.Size(shape_list(v))
        except (OverflowError, RuntimeError, ValueError) as e:
            raise TreeFail(f"invalid torch.Size {short(v)} ({e})") from None
    raise TreeFail(f"tag {tag!r} is not allowed here")


class Unflattener:
    """Decodes a (possibly hostile) tree; TreeFail on anything malformed."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.cache: dict[Any, Any] = {}

    def dec(self, node: Any, depth: int) -> Any:
        tp = type(node)
        if tp is str or tp is bool or node is None or tp is int or tp is float:
            return node
        if depth >= MAX_DEPTH:
            raise TreeFail(f"is nested deeper than {MAX_DEPTH} levels")
        if tp is list:
            return self.seq(node, depth)
        if tp is not dict:
            raise TreeFail(f"holds a {tp.__name__}, which is not a JSON value")
        if TAG not in node:
            out = {}
            for k, c in node.items():
                try:
                    key = unescape(k)
                    out[key] = self.dec(c, depth + 1)
                except TreeFail as e:
                    e.keys.append(k)
                    raise
            return out
        tag = node[TAG]
        if type(tag) is not str:
            raise TreeFail(f"has a tag that is not a string: {short(tag)}")
        if tag in TENSOR_TAGS:
            return self.tensor(node, tag)
        if tag == "tuple":
            check_fields(node, tag)
            return tuple(self.seq(node["v"], depth))
        if tag == "dict":
            check_fields(node, tag)
            return self.mapping(node["items"], depth)
        return dec_leaf(node, tag)

    def seq(self, node: Any, depth: int) -> list[Any]:
        if type(node) is not list:
            raise TreeFail(f"expected a list, got {type(node).__name__}")
        out = []
        for i, c in enumerate(node):
            try:
                out.append(self.dec(c, depth + 1))
            except TreeFail as e:
                e.keys.append(i)
                raise
        return out

    def mapping(self, items: Any, depth: int) -> dict[Any, Any]:
        if type(items) is not list:
            raise TreeFail("dict items must be a list of [key, value] pairs")
        out: dict[Any, Any] = {}
        for item in items:
            if type(item) is not list or len(item) != 2:
                raise TreeFail(f"dict items must be [key, value] pairs, got {short(item)}")
            key = dec_key(item[0])
            if key in out:
                raise TreeFail(f"dict has the key {short(key)} twice")
            try:
                out[key] = self.dec(item[1], depth + 1)
            except TreeFail as e:
                e.keys.append(key)
                raise
        return out

    def tensor(self, node: dict[str, Any], tag: str) -> Any:
        check_fields(node, tag)
        key = node["key"]
        if type(key) is not str:
            raise TreeFail(f"tensor key must be a string, got {short(key)}")
        dt = np_dtype(node["dtype"]) if tag == "ndarray" else None
        shape = tuple(shape_list(node["shape"])) if tag == "ndarray" else ()
        ident = (tag, key, dt, shape)
        if ident in self.cache:
            return self.cache[ident]
        try:
            t = self.tensors[key]
        except KeyError:
            raise TreeFail(f"tensor {key!r} is missing from the checkpoint's tensors") from None
        if tag == "dtensor" and getattr(t, "is_sharded_ref", False):
            self.cache[ident] = t  # read later, in the layout the target asks for (sharded.read)
            return t
        if not isinstance(t, torch.Tensor):
            raise TreeFail(f"tensor {key!r} is a {type(t).__name__}, not a tensor")
        if tag == "ctensor":
            if t.dtype not in _COMPLEX_PARTS or t.dim() == 0 or t.shape[-1] != 2:
                raise TreeFail(
                    f"tensor {key!r} ({t.dtype}, {tuple(t.shape)}) is not the real view of a "
                    "complex tensor (float16/32/64 with a last dimension of 2)"
                )
            try:
                t = torch.view_as_complex(t)
            except RuntimeError:
                t = torch.view_as_complex(t.clone(memory_format=torch.contiguous_format))
        value: Any = t
        if tag == "ndarray" and dt is not None:
            value = self.ndarray(t, key, dt, shape)
        self.cache[ident] = value
        return value

    @staticmethod
    def ndarray(t: torch.Tensor, key: str, dt: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = math.prod(shape) * dt.itemsize
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != nbytes:
            raise TreeFail(
                f"tensor {key!r} ({t.dtype}, {tuple(t.shape)}) is not the {nbytes} raw bytes of "
                f"a numpy array of dtype {dt.str} and shape {list(shape)}"
            )
        try:
            if nbytes == 0:
                return np.empty(shape, dt)
            return t.detach().cpu().contiguous().numpy().view(dt).reshape(shape)
        except (OverflowError, TypeError, ValueError) as e:
            raise TreeFail(
                f"tensor {key!r} cannot be viewed as a numpy array of dtype {dt.str} and shape {list(shape)} ({e})"
            ) from None


def children(node: Any) -> list[tuple[Any, str, Any]] | None:
    """(JSON key or index, path segment, child) of a non-empty container node, else None (a leaf)."""
    tp = type(node)
    if tp is list:
        return [(i, str(i), c) for i, c in enumerate(node)] or None
    if tp is not dict:
        return None
    tag = node.get(TAG)
    if tag is None:
        out = []
        for k, c in node.items():
            try:
                out.append((k, unescape(k), c))
            except TreeFail as e:
                e.keys.append(k)
                raise
        return out or None
    if tag == "tuple":
        check_fields(node, tag)
        return [(i, str(i), c) for i, c in enumerate(_list(node["v"]))] or None
    if tag == "dict":
        check_fields(node, tag)
        out = []
        for item in _list(node["items"]):
            if type(item) is not list or len(item) != 2:
                raise TreeFail(f"dict items must be [key, value] pairs, got {short(item)}")
            out.append((item[0], segment(dec_key(item[0])), item[1]))
        return out or None
    return None


def rebuild(node: Any, kept: list[tuple[Any, Any]]) -> Any:
    """A container like ``node`` holding ``kept`` (JSON key or index, child) pairs."""
    if type(node) is list:
        return [c for _, c in kept]
    tag = node.get(TAG)
    if tag is None:
        return dict(kept)
    if tag == "tuple":
        return {TAG: "tuple", "v": [c for _, c in kept]}
    return {TAG: "dict", "items": [[k, c] for k, c in kept]}
