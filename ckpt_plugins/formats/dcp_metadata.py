"""A DCP folder's ``.metadata``, read without running pickle code.

``torch.distributed.checkpoint`` writes its metadata with plain ``pickle.dump`` of a
``Metadata`` dataclass, and its own reader loads it with full ``pickle.load``: a hostile folder
runs any code it likes there. This module reads the same bytes with a :class:`pickle.Unpickler`
whose ``find_class`` knows an explicit list of (module, name) pairs, :data:`ALLOWED_GLOBALS`:
DCP's metadata classes, ``torch.Size``, torch dtypes, the layout and memory-format encodings and
the path classes ``StorageMeta`` may hold. Every other global, dotted names included
(``torch.distributed.checkpoint.metadata`` / ``os.system``), is refused with
:class:`~ckpt_plugins.errors.UnsafeCheckpointError` naming the file and the global, before it is
looked up, so nothing of the file's choosing is called. Persistent ids are refused too.

None of the allowed names resolves to DCP's own classes: each resolves to a stand-in of ours that
only stores what the pickle gives it (:class:`_Record`) or to a pure function building a tuple or
a string. So ``REDUCE`` and ``BUILD`` can call nothing but those, and no import of
``torch.distributed`` is needed. :func:`read_dcp_metadata` then checks every field's type and
range and returns plain frozen records (:class:`DcpMetadata`), with each data file's relative
path checked to stay inside the folder.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_plugins.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "ALLOWED_GLOBALS",
    "METADATA_NAME",
    "BytesEntry",
    "Chunk",
    "DcpMetadata",
    "StorageInfo",
    "TensorEntry",
    "read_dcp_metadata",
]

METADATA_NAME = ".metadata"
"""The metadata file of a DCP folder (``FileSystemWriter``'s ``_metadata_fn``)."""

_MAX_METADATA_BYTES = 1 << 30  # 1 GiB: far above real metadata (~1 KiB per tensor chunk)

_DCP = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
_OLD_SHARD = "torch.distributed._shard.sharded_tensor.metadata"  # torch < 2.1 kept TensorProperties here


class _Record:
    """Stand-in for one of DCP's dataclasses: it keeps the state ``BUILD`` gives it, nothing else.

    ``NEWOBJ`` creates it with no arguments; ``BUILD`` calls :meth:`__setstate__` with a dict
    (dataclasses) or a tuple (``TensorProperties.__getstate__``). Hashing is by identity, which is
    all a dict key (``MetadataIndex`` in ``storage_data``) needs while unpickling.
    """

    kind = "record"

    def __new__(cls, *args: Any) -> _Record:
        if args:
            raise pickle.UnpicklingError(f"{cls.kind} takes no constructor arguments, got {len(args)}")
        return super().__new__(cls)

    def __init__(self) -> None:
        self.state: Any = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, (dict, tuple)):
            raise pickle.UnpicklingError(f"{self.kind}: state is a {type(state).__name__}, not a dict or tuple")
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default) if isinstance(self.state, dict) else default


def _record_class(kind: str) -> type[_Record]:
    return type(kind, (_Record,), {"kind": kind, "__module__": __name__})


_METADATA = _record_class("Metadata")
_TENSOR = _record_class("TensorStorageMetadata")
_BYTES = _record_class("BytesStorageMetadata")
_CHUNK = _record_class("ChunkStorageMetadata")
_PROPERTIES = _record_class("TensorProperties")
_INDEX = _record_class("MetadataIndex")
_STORAGE_META = _record_class("StorageMeta")
_STORAGE_INFO = _record_class("_StorageInfo")


def _size(dims: Any = ()) -> tuple[int, ...]:
    """``torch.Size(dims)`` as a plain tuple of non-negative ints."""
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"torch.Size needs non-negative ints, got {dims!r:.80}")
    return tuple(dims)


def _layout(name: Any) -> str:
    """``torch.serialization._get_layout('torch.strided')``: the layout's name, checked later."""
    if not isinstance(name, str):
        raise pickle.UnpicklingError(f"a tensor layout is named by a string, got {name!r:.80}")
    return name


def _memory_format(code: Any) -> int:
    """``_MEM_FORMAT_ENCODING(n)``: the enum's value (0 contiguous, 1 channels_last, 2 preserve)."""
    if type(code) is not int or code not in (0, 1, 2):
        raise pickle.UnpicklingError(f"unknown memory format encoding {code!r:.80}")
    return code


def _path(*parts: Any) -> str:
    """``PosixPath('a', 'b')`` (``StorageMeta.checkpoint_id``) as a string; it is never opened."""
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("a path is made of strings")
    return "/".join(parts)


_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (_DCP, "Metadata"): _METADATA,
    (_DCP, "TensorStorageMetadata"): _TENSOR,
    (_DCP, "BytesStorageMetadata"): _BYTES,
    (_DCP, "ChunkStorageMetadata"): _CHUNK,
    (_DCP, "TensorProperties"): _PROPERTIES,
    (_DCP, "MetadataIndex"): _INDEX,
    (_DCP, "StorageMeta"): _STORAGE_META,
    (_DCP, "_MEM_FORMAT_ENCODING"): _memory_format,
    (_OLD_SHARD, "TensorProperties"): _PROPERTIES,
    (_OLD_SHARD, "MEM_FORMAT_ENCODING"): _memory_format,
    (_DCP_FS, "_StorageInfo"): _STORAGE_INFO,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _layout,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
    **{
        (module, name): _path
        for module in ("pathlib", "pathlib._local")
        for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
    },
}
"""Every global a DCP ``.metadata`` pickle may name, and what it resolves to here (never DCP's
own class: a :class:`_Record` stand-in, a pure function, or a ``torch.dtype`` value)."""


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` and no persistent ids."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.path}: the DCP metadata pickle needs the global {module}.{name}, which is not "
                f"one of DCP's metadata classes; refused without running it (a DCP .metadata file "
                f"holds only those). If you wrote this folder yourself and trust it, load it with "
                f"torch.distributed.checkpoint, or pass allow_unsafe_pickle=True."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r:.80} in DCP metadata (it has none)")


# ------------------------------------------------------------------------------- checked records


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: where it sits in the full tensor, and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    storage: StorageInfo


@dataclass(frozen=True)
class StorageInfo:
    """Where one item's bytes are: a file of the folder, a byte offset and a length."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the saved state: its global shape and dtype, and the chunks that cover it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class BytesEntry:
    """A non-tensor value, stored as one ``torch.save`` pickle."""

    storage: StorageInfo


@dataclass(frozen=True)
class DcpMetadata:
    """A DCP folder's metadata, checked.

    Attributes:
        entries: fully qualified name (``"model.w"``) -> tensor or bytes entry, in saved order.
        paths: fully qualified name -> the key path it came from (``("opt", "param_groups", 0)``:
            ints are list indices), for the names DCP's default planner recorded.
        version: DCP's format version string, when it wrote one.
    """

    entries: dict[str, TensorEntry | BytesEntry]
    paths: dict[str, tuple[str | int, ...]]
    version: str | None


def _fail(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: not valid DCP metadata: {what}")


def _storage_info(path: str, root: str, fqn: str, rec: Any) -> StorageInfo:
    if not isinstance(rec, _STORAGE_INFO):
        raise _fail(path, f"storage of {fqn!r} is a {type(rec).__name__}, not a _StorageInfo")
    rel, offset, length = rec.field("relative_path"), rec.field("offset"), rec.field("length")
    transforms = rec.field("transform_descriptors") or ()
    if not isinstance(rel, str) or not rel or type(offset) is not int or type(length) is not int:
        raise _fail(path, f"storage of {fqn!r} lacks a file name, offset or length")
    if offset < 0 or length < 0:
        raise _fail(path, f"storage of {fqn!r} has a negative offset or length ({offset}, {length})")
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise _fail(path, f"storage of {fqn!r} has transform descriptors that are not strings")
    base = os.path.realpath(root)
    if os.path.isabs(rel) or not os.path.realpath(os.path.join(base, rel)).startswith(base + os.sep):
        raise _fail(path, f"data file {rel!r} of {fqn!r} is outside the checkpoint folder")
    return StorageInfo(rel, offset, length, tuple(transforms))


def _index_key(path: str, rec: Any) -> tuple[str, tuple[int, ...] | None]:
    if not isinstance(rec, _INDEX) or not isinstance(rec.field("fqn"), str):
        raise _fail(path, f"a storage_data key is a {type(rec).__name__}, not a MetadataIndex")
    offset = rec.field("offset")
    if offset is not None and not isinstance(offset, tuple):
        raise _fail(path, f"MetadataIndex {rec.field('fqn')!r} has an offset that is not a torch.Size")
    return rec.field("fqn"), offset


def _tensor_entry(path: str, fqn: str, rec: Any, storage: dict[Any, StorageInfo]) -> TensorEntry:
    props, shape, chunks = rec.field("properties"), rec.field("size"), rec.field("chunks")
    state = props.state if isinstance(props, _PROPERTIES) else None
    dtype = state[0] if isinstance(state, tuple) and state else (state or {}).get("dtype")
    if not isinstance(dtype, torch.dtype):
        raise _fail(path, f"tensor {fqn!r} has no dtype")
    layout = state[1] if isinstance(state, tuple) and len(state) > 1 else "torch.strided"
    if layout != "torch.strided":
        raise _fail(path, f"tensor {fqn!r} has layout {layout!r}; only strided tensors are read")
    if not isinstance(shape, tuple) or not isinstance(chunks, list):
        raise _fail(path, f"tensor {fqn!r} lacks its size or chunk list")
    out = []
    for chunk in chunks:
        offsets, sizes = (chunk.field("offsets"), chunk.field("sizes")) if isinstance(chunk, _CHUNK) else (None, None)
        if (
            not isinstance(offsets, tuple)
            or not isinstance(sizes, tuple)
            or not len(offsets) == len(sizes) == len(shape)
        ):
            raise _fail(path, f"a chunk of tensor {fqn!r} does not match its {len(shape)}-d shape")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise _fail(path, f"chunk at {list(offsets)} of tensor {fqn!r} reaches outside its shape {list(shape)}")
        info = storage.get((fqn, offsets))
        if info is None:
            raise _fail(path, f"chunk at {list(offsets)} of tensor {fqn!r} has no storage entry")
        out.append(Chunk(offsets, sizes, info))
    return TensorEntry(dtype, shape, tuple(out))


def _segment(part: Any) -> bool:
    return isinstance(part, str) or type(part) is int


def _planner_paths(planner_data: Any, names: set[str]) -> dict[str, tuple[str | int, ...]]:
    """DCP's default planner maps each name to its key path; anything else means flat names."""
    if not isinstance(planner_data, dict):
        return {}
    paths = {}
    for fqn, key_path in planner_data.items():
        if fqn in names and isinstance(key_path, tuple) and key_path and all(_segment(p) for p in key_path):
            paths[fqn] = key_path
    return paths if len(paths) == len(names) else {}


def parse_metadata(data: bytes, path: str, root: str) -> DcpMetadata:
    """Unpickle and check metadata bytes (``path`` names the file in errors; ``root`` its folder)."""
    try:
        raw = _MetadataUnpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # pickle raises many kinds on damaged input (EOFError, ValueError, ...)
        raise _fail(path, f"the pickle cannot be read ({exc!r:.200})") from exc
    if not isinstance(raw, _METADATA) or not isinstance(raw.field("state_dict_metadata"), dict):
        raise _fail(path, f"it holds a {type(raw).__name__}, not a Metadata with state_dict_metadata")
    storage_data = raw.field("storage_data")
    if not isinstance(storage_data, dict):
        raise _fail(path, "storage_data is not a dict (a DCP folder not written by FileSystemWriter?)")
    storage = {}
    for key, info in storage_data.items():
        fqn, offset = _index_key(path, key)
        storage[(fqn, offset)] = _storage_info(path, root, fqn, info)
    entries: dict[str, TensorEntry | BytesEntry] = {}
    for fqn, rec in raw.field("state_dict_metadata").items():
        if not isinstance(fqn, str):
            raise _fail(path, f"a state key is a {type(fqn).__name__}, not a string")
        if isinstance(rec, _TENSOR):
            entries[fqn] = _tensor_entry(path, fqn, rec, storage)
        elif isinstance(rec, _BYTES):
            info = storage.get((fqn, None))
            if info is None:
                raise _fail(path, f"value {fqn!r} has no storage entry")
            entries[fqn] = BytesEntry(info)
        else:
            raise _fail(path, f"entry {fqn!r} is a {type(rec).__name__}, not tensor or bytes metadata")
    version = raw.field("version")
    return DcpMetadata(
        entries, _planner_paths(raw.field("planner_data"), set(entries)), version if isinstance(version, str) else None
    )


def read_dcp_metadata(root: str | os.PathLike) -> DcpMetadata:
    """Read and check ``root/.metadata`` without running pickle code.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside :data:`ALLOWED_GLOBALS` (named).
        CorruptCheckpointError: the file is missing, truncated or not DCP metadata (named).
    """
    root = os.fspath(root)
    path = os.path.join(root, METADATA_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot read the DCP metadata ({exc.strerror or exc})") from exc
    if len(data) > _MAX_METADATA_BYTES:
        raise _fail(path, f"it is over {_MAX_METADATA_BYTES} bytes")
    return parse_metadata(data, path, root)
