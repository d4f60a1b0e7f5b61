"""``torch.distributed.checkpoint`` (DCP) folders, read without running pickle code.

A DCP folder holds ``.metadata`` (a pickle of DCP's ``Metadata``) and data files
(``__<rank>_<n>.distcp``). Here:

- ``.metadata`` is read by :mod:`~ckpt_plugins.formats.dcp_metadata`: an unpickler that knows only
  DCP's own metadata classes, ``torch.Size`` and torch dtypes (rebuilt as plain records of ours);
  anything else is refused with :class:`~ckpt_plugins.errors.UnsafeCheckpointError` before it runs.
- Each tensor chunk is one ``torch.save`` of that chunk at ``offset``/``length`` in a data file
  (what DCP's ``FileSystemWriter`` writes), read with torch's ``weights_only`` loader; a tensor
  saved in several chunks (FSDP2 / DTensor shards, one per rank) is assembled into one full plain
  tensor, after checking that the chunks cover it exactly once.
- Non-tensor values ("bytes" items: numbers, strings, lists of ints) are ``torch.save`` pickles too,
  read with the same ``weights_only`` loader; one that needs more is refused naming its key.

Tensors are read one at a time (:func:`iter_dcp`), so memory holds one tensor and its chunks.
DCP stringifies dict keys (``optimizer.state.0`` has the key ``"0"``); list indices stay lists.

``allow_unsafe_pickle=True`` reads what the safe path refuses with full pickle: byte items with
``torch.load(weights_only=False)``, and metadata the allow-list refuses (a custom planner's
classes, storage extensions) through DCP itself (``format_utils.dcp_to_torch_save``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import torch

from ckpt_plugins.errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from ckpt_plugins.formats._pickle import MapLocation, load_pickle, load_pickle_stream
from ckpt_plugins.formats.dcp_metadata import (
    METADATA_NAME,
    BytesEntry,
    Chunk,
    DcpMetadata,
    StorageInfo,
    TensorEntry,
    read_dcp_metadata,
)
from ckpt_plugins.formats.safetensors_file import safetensors_device
from ckpt_plugins.tree.walk import MAX_DEPTH, map_leaves, segment, select

__all__ = ["METADATA_NAME", "iter_dcp", "read_dcp"]

log = logging.getLogger(__name__)


class _FileView(io.RawIOBase):
    """``length`` bytes of an open file from ``offset`` on, as a seekable stream of its own."""

    def __init__(self, f: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(view[:n])  # type: ignore[attr-defined]
        self._pos += got
        return got


class _Reader:
    """Reads the items of one DCP folder, keeping each data file open once."""

    def __init__(self, root: str, meta: DcpMetadata, *, device: str, allow_unsafe_pickle: bool) -> None:
        self.root, self.meta, self.device, self.unsafe = root, meta, device, allow_unsafe_pickle
        self._files: dict[str, tuple[IO[bytes], int]] = {}

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()

    def _view(self, fqn: str, info: StorageInfo) -> tuple[IO[bytes], str]:
        file_path = os.path.join(self.root, info.relative_path)
        if info.transforms:
            raise ConfigError(
                f"{file_path}: {fqn!r} is stored through DCP storage extensions {list(info.transforms)} "
                f"(compression), which this reader does not decode; read the folder with "
                f"torch.distributed.checkpoint, or pass allow_unsafe_pickle=True to let DCP convert it."
            )
        if info.relative_path not in self._files:
            try:
                f: IO[bytes] = open(file_path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise CorruptCheckpointError(
                    f"{file_path}: data file of {fqn!r} named in {METADATA_NAME} cannot be opened "
                    f"({exc.strerror or exc}); the DCP folder is incomplete"
                ) from exc
            self._files[info.relative_path] = (f, os.fstat(f.fileno()).st_size)
        f, size = self._files[info.relative_path]
        if info.offset + info.length > size:
            raise CorruptCheckpointError(
                f"{file_path}: {fqn!r} should be at bytes {info.offset}..{info.offset + info.length}, "
                f"but the file has {size} bytes: it is truncated"
            )
        view = cast(IO[bytes], _FileView(f, info.offset, info.length))
        return view, f"{file_path} (item {fqn!r})"

    def value(self, fqn: str, entry: BytesEntry) -> Any:
        view, name = self._view(fqn, entry.storage)
        try:
            return load_pickle_stream(view, name, allow_unsafe_pickle=self.unsafe)
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(
                f"{exc} The value is the DCP item {fqn!r}; read the rest with include= leaving it out.",
                key_path=fqn,
            ) from exc

    def _chunk(self, fqn: str, entry: TensorEntry, chunk: Chunk) -> torch.Tensor:
        view, name = self._view(fqn, chunk.storage)
        t = load_pickle_stream(view, name)  # a chunk is always a plain tensor: never full pickle
        if not isinstance(t, torch.Tensor) or t.dtype != entry.dtype or tuple(t.shape) != chunk.sizes:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CorruptCheckpointError(
                f"{name}: chunk at {list(chunk.offsets)} should be a {entry.dtype} tensor of shape "
                f"{list(chunk.sizes)} as {METADATA_NAME} says, but holds {got}"
            )
        return t

    def tensor(self, fqn: str, entry: TensorEntry) -> torch.Tensor:
        numel = math.prod(entry.shape)
        covered = sum(math.prod(c.sizes) for c in entry.chunks)
        if len(entry.chunks) == 1 and entry.chunks[0].sizes == entry.shape:
            out = self._chunk(fqn, entry, entry.chunks[0])
        else:
            if covered != numel:
                raise CorruptCheckpointError(
                    f"{os.path.join(self.root, METADATA_NAME)}: the chunks of {fqn!r} hold {covered} of its "
                    f"{numel} elements (shape {list(entry.shape)}); the DCP folder is incomplete"
                )
            stored = sum(self._view(fqn, c.storage)[0].seek(0, io.SEEK_END) for c in entry.chunks)  # bounds checked
            if stored < numel * entry.dtype.itemsize:  # before allocating what the metadata claims
                raise CorruptCheckpointError(
                    f"{os.path.join(self.root, METADATA_NAME)}: {fqn!r} claims {numel * entry.dtype.itemsize} "
                    f"bytes (shape {list(entry.shape)}) but its chunks are stored in {stored}; the metadata is damaged"
                )
            out = torch.empty(entry.shape, dtype=entry.dtype)
            seen = torch.zeros(entry.shape, dtype=torch.bool)
            for chunk in entry.chunks:
                where = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
                if seen[where].any():
                    raise CorruptCheckpointError(
                        f"{os.path.join(self.root, METADATA_NAME)}: chunks of {fqn!r} overlap at "
                        f"{list(chunk.offsets)}; the metadata is damaged"
                    )
                seen[where] = True
                out[where] = self._chunk(fqn, entry, chunk)
        return out if self.device == "cpu" else out.to(self.device)

    def load(self, fqn: str, *, meta: bool = False) -> Any:
        entry = self.meta.entries[fqn]
        if isinstance(entry, BytesEntry):
            return self.value(fqn, entry)
        if meta:
            return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        return self.tensor(fqn, entry)


def _key_paths(root: str, meta: DcpMetadata) -> dict[str, tuple[str | int, ...]]:
    paths = {fqn: meta.paths.get(fqn, (fqn,)) for fqn in meta.entries}
    if any(len(p) > MAX_DEPTH for p in paths.values()):
        raise CorruptCheckpointError(
            f"{os.path.join(root, METADATA_NAME)}: a key path is nested deeper than {MAX_DEPTH}"
        )
    return paths


def _nest(root: str, paths: dict[str, tuple[str | int, ...]]) -> dict[Any, Any]:
    """The nested state DCP was given, with each leaf the name of its item (ints: list indices)."""
    tree: dict[Any, Any] = {}
    for fqn, key_path in paths.items():
        node = tree
        for seg in key_path[:-1]:
            node = node.setdefault(seg, {})
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or key_path[-1] in node:
            raise CorruptCheckpointError(
                f"{os.path.join(root, METADATA_NAME)}: key path {'.'.join(map(segment, key_path))!r} "
                f"clashes with another entry"
            )
        node[key_path[-1]] = _Leaf(fqn)

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: listify(v) for k, v in node.items()}
        if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
            return [out[i] for i in range(len(out))]
        return out

    return {k: listify(v) for k, v in tree.items()}


class _Leaf:
    """A not-yet-read item in the nested tree (a leaf to the walkers)."""

    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn


def _open(path: str, map_location: MapLocation, allow_unsafe_pickle: bool) -> tuple[DcpMetadata, _Reader]:
    meta = read_dcp_metadata(path)
    return meta, _Reader(path, meta, device=safetensors_device(map_location), allow_unsafe_pickle=allow_unsafe_pickle)


def iter_dcp(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(key path, value)`` for each item of a DCP folder, reading one tensor at a time.

    Tensors come back as full plain tensors (chunks assembled). Items ``include`` rejects are not read.

    Raises:
        UnsafeCheckpointError: ``.metadata`` names a global outside the allow-list, or a value
            needs full pickle (both named).
        CorruptCheckpointError: a file is missing, truncated or inconsistent with the metadata.
    """
    root = os.fspath(path)
    meta, reader = _open(root, map_location, allow_unsafe_pickle)
    try:
        for fqn, key_path in _key_paths(root, meta).items():
            key = ".".join(map(segment, key_path))
            if include is None or include(key):
                yield key, reader.load(fqn)
    finally:
        reader.close()


def read_dcp(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = "cpu",
    allow_unsafe_pickle: bool = False,
    include: Callable[[str], bool] | None = None,
    meta: bool = False,
) -> Any:
    """Read a DCP folder into the nested state it was saved from, without running pickle code.

    Args:
        path: the folder (it holds ``.metadata``).
        map_location: the device tensors go to (a device or its name).
        allow_unsafe_pickle: read with full pickle what the safe path refuses (trusted folders only).
        include: keep only leaves whose key path satisfies it; other items are never read.
        meta: tensors on the ``meta`` device (shape and dtype only; no tensor data is read).

    Returns:
        A dict; tensors are full plain tensors, whatever the chunks they were saved in.

    Raises:
        UnsafeCheckpointError: the metadata needs a global outside DCP's metadata classes, or a
            value needs full pickle (named), and ``allow_unsafe_pickle`` is False.
        CorruptCheckpointError: a file is missing, truncated or does not match the metadata.
        ConfigError: ``map_location`` is not a device, or an item is stored through DCP storage
            extensions (compression) and ``allow_unsafe_pickle`` is False.

    Example:
        >>> state = read_dcp("dcp_ckpt", include=lambda k: k.startswith("model."))
    """
    root = os.fspath(path)
    safetensors_device(map_location)  # a bad map_location is a ConfigError before anything is read
    try:
        dcp_meta, reader = _open(root, map_location, allow_unsafe_pickle)
    except UnsafeCheckpointError:
        if not allow_unsafe_pickle:
            raise
        return _read_with_full_pickle(root, map_location=map_location, include=include)
    try:
        tree = _nest(root, _key_paths(root, dcp_meta))
        if include is not None:
            tree = select(tree, include, empty={})
        return map_leaves(tree, lambda leaf: reader.load(leaf.fqn, meta=meta) if isinstance(leaf, _Leaf) else leaf)
    except ConfigError:
        if not allow_unsafe_pickle:
            raise
        return _read_with_full_pickle(root, map_location=map_location, include=include)
    finally:
        reader.close()


def _read_with_full_pickle(path: str, *, map_location: MapLocation, include: Callable[[str], bool] | None) -> Any:
    """DCP's own reader (full pickle), for folders the safe path cannot read; trusted folders only."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="ckpt_plugins_dcp_") as tmp:
        converted = os.path.join(tmp, "state.pt")
        log.warning("Reading %s with DCP's own reader (full pickle; allow_unsafe_pickle=True)", path)
        try:
            dcp_to_torch_save(path, converted)
        except Exception as exc:  # DCP raises many kinds (CheckpointException, OSError, ...)
            raise CorruptCheckpointError(f"Cannot read DCP folder {path}: {exc!r}") from exc
        # The temporary file is deleted on exit, so it is not memory-mapped.
        return load_pickle(converted, map_location=map_location, allow_unsafe_pickle=True, include=include, mmap=False)
