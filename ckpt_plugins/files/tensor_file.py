"""Tensor files: the safetensors format, streamed, with a checksum computed on the way.

Files written here are plain safetensors files (``safetensors.safe_open`` reads them, and we read
files it writes). We stream them ourselves instead of calling ``safetensors.torch.save_file``
because that function first turns every tensor into a Python ``bytes`` object: a second copy of
the whole state in memory and a second pass over it. Here each tensor's memory goes straight to
the file, and the checksum (:mod:`.checksum`: xxh3 per 16 MiB chunk, so it verifies on every
core) is computed over the same buffers in the same pass.

Reading a local file maps it (private, copy-on-write) and returns tensors backed by the mapping:
no copy, and only the bytes returned (plus, for a verified full read, the checksum's pass over the
file, which runs on every core and is the read) are ever read. Files elsewhere are read into one
tensor per entry, in file order, hashed on the way. Headers come from disk and are validated
before use (sizes, offsets, dtypes).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, cast

import torch

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.checksum import FileHasher, digest_buffer, hasher_like
from ckpt_plugins.storage import Storage
from ckpt_plugins.storage.direct_io import ALIGN, direct_writer

_Entry = tuple[torch.dtype, list[int], int, int]  # dtype, shape, begin, end (offsets in the data)

__all__ = [
    "PENDING_CHECKSUM",
    "FileRecord",
    "HashingWriter",
    "Prehashed",
    "checksum_file",
    "data_offsets",
    "file_head",
    "file_layout",
    "hash_mapping",
    "is_mapped",
    "read_header",
    "read_mapped",
    "read_tensor_file",
    "tensor_bytes",
    "write_tensor_file",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
WRITE_CHUNK = 64 << 20  # hash and write a contiguous run in slices, so the two overlap

_DTYPE_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
):
    if hasattr(torch, _name):
        _DTYPE_TO_CODE[getattr(torch, _name)] = _code
_CODE_TO_DTYPE = {code: dtype for dtype, code in _DTYPE_TO_CODE.items()}


PENDING_CHECKSUM = "pending"
"""The ``xxh3_64`` of a file committed before its checksum was recorded: only the in-memory tier
writes it (:mod:`ckpt_plugins.memory.mapped` records the checksum just after the commit), and
only a process that died in between leaves it for a reader, who can then check the size only."""


@dataclass(frozen=True)
class FileRecord:
    """Size and checksum of one written file, as stored in the manifest."""

    size: int
    xxh3_64: str

    @property
    def checksummed(self) -> bool:
        """Whether the checksum was recorded (see :data:`PENDING_CHECKSUM`)."""
        return self.xxh3_64 != PENDING_CHECKSUM


@dataclass(frozen=True)
class Prehashed:
    """The checksum of a tensor file computed while its tensors were staged (:mod:`.stager`
    copies and hashes each piece while it is in the cache, which saves the writer a pass over the
    whole state): ``digest`` is the xxh3 of ``head`` followed by the ``nbytes`` at ``address``.
    :func:`write_tensor_file` uses it only when it writes exactly that header and that memory
    as the file's one run of data, and hashes the file itself otherwise."""

    head: bytes
    address: int
    nbytes: int
    digest: str


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, including 0-dim and empty)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    return memoryview(cast(Any, flat.view(torch.uint8).numpy())).cast("B")  # ndarray: a buffer


def _runs(tensors: Iterable[torch.Tensor]) -> Iterator[memoryview]:
    """The tensors' bytes, in order, with neighbours that are adjacent in memory merged into one
    view (staged tensors of one file are: see :mod:`.snapshot`)."""
    start: int | None = None  # the run being merged; the caller keeps its tensors alive
    end: int | None = None
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if not nbytes:
            continue
        ptr = tensor.data_ptr() if tensor.is_contiguous() and not tensor.is_cuda else None
        if ptr is not None and end is not None and ptr == end:
            end += nbytes
            continue
        if start is not None and end is not None:
            yield _memory(start, end - start)
        start, end = (ptr, ptr + nbytes) if ptr is not None else (None, None)
        if ptr is None:
            yield tensor_bytes(tensor)
    if start is not None and end is not None:
        yield _memory(start, end - start)


def _memory(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


def file_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The order tensors are written in: largest element size first (stable), which keeps every
    offset aligned to its dtype, as safetensors itself does. The stager lays out its memory in
    the same order, so a file's staged tensors are one run."""
    return sorted(tensors, key=lambda k: -tensors[k].element_size())


def file_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[list[str], bytes, int]:
    """How :func:`write_tensor_file` lays out a file: the tensors' order, the bytes before their
    data (length and header), and the data's length."""
    order = file_order(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key in order:
        tensor = tensors[key]
        if tensor.dtype not in _DTYPE_TO_CODE:
            raise TypeError(f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _DTYPE_TO_CODE[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    # Spaces up to a page boundary (the format allows trailing spaces in the header): the data
    # then starts page-aligned in the file, so aligned memory can go to disk with O_DIRECT as is.
    blob += b" " * (-(8 + len(blob)) % ALIGN)
    return order, struct.pack("<Q", len(blob)) + blob, offset


def file_head(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes :func:`write_tensor_file` writes before the tensors' data (length and header)."""
    return file_layout(tensors, metadata)[1]


def data_offsets(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, tuple[int, int]]:
    """Where :func:`write_tensor_file` puts each tensor's bytes: ``[begin, end)`` from the start of
    the file (header included), known before the file is written."""
    order, head, _ = file_layout(tensors, metadata)
    out, offset = {}, len(head)
    for key in order:
        nbytes = tensors[key].numel() * tensors[key].element_size()
        out[key] = (offset, offset + nbytes)
        offset += nbytes
    return out


def write_tensor_file(
    storage: Storage,
    path: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    direct_io: bool = True,
    prehashed: Prehashed | None = None,
) -> FileRecord:
    """Write ``tensors`` (contiguous, on CPU) to ``path`` and fsync it; return size and checksum.

    With ``direct_io`` the bytes bypass the page cache where the file system allows it
    (:mod:`.direct_io`). ``prehashed``: the checksum taken while staging (see :class:`Prehashed`);
    used when it describes exactly what is written here, else the file is hashed as it is written.
    """
    order, head, data_len = file_layout(tensors, metadata)
    runs = list(_runs(tensors[key] for key in order))
    known = prehashed.digest if prehashed is not None and _describes(prehashed, head, runs) else None
    hasher = None if known is not None else FileHasher(head)
    with storage.open_write(path) as out, direct_writer(out, direct_io) as direct:
        # The tensors outlive the direct writer, so it may write them from where they are.
        # An object-store upload (storage.object_store) likewise sends views of them as its parts.
        write = partial(direct.write, stable=True) if direct is not None else getattr(out, "write_stable", out.write)
        write(head)
        for run in runs:
            for start in range(0, len(run), WRITE_CHUNK):
                chunk = run[start : start + WRITE_CHUNK]
                if hasher is not None:
                    hasher.update(chunk)
                write(chunk)
        if direct is not None:
            direct.finish()
    return FileRecord(size=len(head) + data_len, xxh3_64=hasher.hexdigest() if hasher is not None else str(known))


def _describes(prehashed: Prehashed, head: bytes, runs: list[memoryview]) -> bool:
    """Whether ``prehashed`` was taken over this header and this memory, as one run."""
    if prehashed.head != head or len(runs) != 1 or len(runs[0]) != prehashed.nbytes:
        return False
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(runs[0])) == prehashed.address
    except (TypeError, ValueError):  # a read-only view: not staged memory
        return False


def read_header(f: BinaryIO, path: str, file_size: int) -> tuple[dict[str, _Entry], int]:
    """Read and validate a safetensors header; return (entries, offset where data starts)."""
    raw_len = f.read(8)
    if len(raw_len) != 8:
        raise CorruptCheckpointError(f"{path}: file is truncated (no safetensors header)")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise CorruptCheckpointError(f"{path}: header length {header_len} is impossible for a {file_size}-byte file")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entries[key] = _validate_entry(path, key, entry, data_len)
    return entries, data_start


def _validate_entry(path: str, key: str, entry: object, data_len: int) -> _Entry:
    try:
        dtype = _CODE_TO_DTYPE[entry["dtype"]]  # type: ignore[index]
        shape = [int(d) for d in entry["shape"]]  # type: ignore[index]
        begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: header entry {key!r} is malformed ({exc!r})") from exc
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len or (end - begin) != math.prod(shape) * itemsize:
        raise CorruptCheckpointError(
            f"{path}: header entry {key!r} (shape {shape}, offsets {begin}..{end}) does not fit "
            f"the file's {data_len} data bytes; the file is damaged or truncated"
        )
    return dtype, shape, begin, end


def read_tensor_file(
    storage: Storage,
    path: str,
    *,
    keys: Iterable[str] | None = None,
    expected: FileRecord | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read tensors from ``path``: all of them (checksummed against ``expected``) or only ``keys``.

    A file on local disk is mapped (:func:`read_mapped`): the tensors returned are backed by a
    private copy-on-write mapping of the file, so nothing is copied and bytes that are not
    returned (or not checksummed) are never read. Elsewhere (object stores, fsspec) the bytes are
    read into one tensor per entry.

    A partial read leaves the rest of the file alone, so it checks the file size and header but
    cannot check the whole-file checksum.
    """
    local = storage.local_path(path)
    if local is not None and _CAN_MAP:
        out = read_mapped(local, path, keys=keys, expected=expected)
    else:
        out = _read_streamed(storage, path, keys=keys, expected=expected)
    if torch.device(map_location) != torch.device("cpu"):
        out = {k: v.to(map_location) for k, v in out.items()}
    return out


def _check_size(path: str, file_size: int, expected: FileRecord | None) -> None:
    if expected is not None and file_size != expected.size:
        raise CorruptCheckpointError(
            f"{path}: size is {file_size} bytes but the manifest says {expected.size}; "
            "the file is truncated or was replaced"
        )


def _check_keys(path: str, entries: Mapping[str, _Entry], wanted: set[str] | None) -> None:
    missing = set() if wanted is None else wanted - entries.keys()
    if missing:
        raise CorruptCheckpointError(
            f"{path}: tensors {sorted(missing)[:5]} are listed in the manifest but not in the file"
        )


def _check_digest(path: str, digest: str | None, expected: FileRecord | None) -> None:
    if digest is not None and expected is not None and expected.checksummed and digest != expected.xxh3_64:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (xxh3 {digest}, manifest {expected.xxh3_64}); the file is damaged"
        )


def _read_streamed(
    storage: Storage, path: str, *, keys: Iterable[str] | None, expected: FileRecord | None
) -> dict[str, torch.Tensor]:
    """Allocate one tensor per entry and ``readinto`` its bytes, in file order, hashing on a
    helper thread as the reads go (files that cannot be mapped)."""
    try:
        file_size = storage.size(path)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{path}: tensor file is missing") from exc
    _check_size(path, file_size, expected)
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    with storage.open_read(path) as f:
        entries, data_start = read_header(f, path, file_size)
        _check_keys(path, entries, wanted)
        full = wanted is None
        hasher = _OrderedHasher(expected.xxh3_64) if full and expected is not None else None
        if hasher is not None:
            f.seek(0)
            hasher.update(f.read(data_start))
        position = data_start
        for key, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            if not full and key not in wanted:  # type: ignore[operator]
                continue
            tensor = torch.empty(shape, dtype=dtype)
            if end > begin:
                if position != data_start + begin:  # partial reads, or a gap in a foreign file
                    f.seek(data_start + begin)
                view = tensor_bytes(tensor)
                got = cast(Any, f).readinto(view)  # every binary file we open has readinto
                if got != end - begin:
                    raise CorruptCheckpointError(f"{path}: file ends inside tensor {key!r}")
                position = data_start + end
                if hasher is not None:
                    hasher.update(view)
            out[key] = tensor
    _check_digest(path, hasher.hexdigest() if hasher is not None else None, expected)
    return out


_CAN_MAP = hasattr(mmap, "MAP_PRIVATE")  # POSIX


def read_mapped(
    local_path: str,
    path: str | None = None,
    *,
    keys: Iterable[str] | None = None,
    expected: FileRecord | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a local file, backed by one private (copy-on-write) mapping of it.

    * Writing into a returned tensor changes that tensor only (``MAP_PRIVATE``), never the file.
    * The tensors stay valid when the file is unlinked or renamed over (the mapping keeps the
      inode; every writer here writes a new file and renames it), until the last one is freed.
      A file truncated or rewritten in place by something else would not be safe: nothing here
      does that.
    * With ``expected`` and no ``keys``, the whole file is hashed (xxh3) before anything is
      returned; that pass is the read (the pages it faults in are the tensors' pages). Without
      it, nothing is read here: the returned tensors' pages are read when first touched (the
      kernel's own readahead around each fault; a ``MADV_WILLNEED`` hint measured slower cold),
      and the rest of the file never is.
    * A tensor whose offset is not a multiple of its dtype's size (possible in foreign files) is
      copied into memory of its own instead.

    ``path`` names the file in errors (default: ``local_path``).
    """
    path = path or local_path
    wanted = None if keys is None else set(keys)
    try:
        fd = os.open(local_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{path}: tensor file is missing") from exc
    try:
        file_size = os.fstat(fd).st_size
        _check_size(path, file_size, expected)
        if file_size < 8:
            raise CorruptCheckpointError(f"{path}: file is truncated (no safetensors header)")
        mapped = mmap.mmap(fd, file_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the file
    entries, data_start = read_header(cast(BinaryIO, mapped), path, file_size)
    _check_keys(path, entries, wanted)
    chosen = [(k, e) for k, e in entries.items() if wanted is None or k in wanted]
    if expected is not None and wanted is None:  # a whole read: verify
        _check_digest(path, hash_mapping(mapped, file_size, like=expected.xxh3_64), expected)
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, shape, begin, end) in chosen:
        out[key] = _mapped_tensor(mapped, data_start + begin, end - begin, dtype, shape)
    return out


def _mapped_tensor(mapped: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if offset % itemsize:  # the mapping is page-aligned: an unaligned offset is an unaligned address
        tensor = torch.empty(shape, dtype=dtype)
        tensor_bytes(tensor)[:] = memoryview(mapped)[offset : offset + nbytes]
        return tensor
    # frombuffer holds a reference to the mapping: it is unmapped when the last tensor goes.
    tensor = torch.frombuffer(mapped, dtype=dtype, count=nbytes // itemsize, offset=offset).view(shape)
    key = id(tensor)
    _MAPPED[key] = weakref.ref(tensor, lambda _ref: _MAPPED.pop(key, None))
    return tensor


_MAPPED: dict[int, weakref.ref[torch.Tensor]] = {}  # by id: a tensor's == is elementwise


def is_mapped(tensor: torch.Tensor) -> bool:
    """True for a tensor :func:`read_mapped` returned (backed by a mapping of a checkpoint file)."""
    ref = _MAPPED.get(id(tensor))
    return ref is not None and ref() is tensor


def _willneed(mapped: mmap.mmap, offset: int, length: int) -> None:
    """``madvise(MADV_WILLNEED)`` on the pages of ``[offset, offset + length)``: the kernel starts
    reading what is not cached and returns. Only a hint: where refused, pages are read on touch."""
    option = getattr(mmap, "MADV_WILLNEED", None)
    start = offset - offset % mmap.PAGESIZE
    if option is None or length <= 0:
        return
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(option, start, min(len(mapped), offset + length) - start)


def hash_mapping(mapped: mmap.mmap, size: int, *, like: str | None = None, threads: int | None = None) -> str:
    """Checksum of the whole mapping (:func:`~.checksum.digest_buffer`: its chunks on every
    core, or on ``threads``). The pass faults the pages in (from the page cache, or from disk
    after the readahead hint) as it hashes, so the hash is the read, in parallel and with the GIL
    released. ``like``: a recorded digest, to compute one of the same scheme."""
    _willneed(mapped, 0, size)
    return digest_buffer(memoryview(mapped)[:size], like=like, threads=threads)


class _OrderedHasher:
    """xxh3 on a helper thread, fed in order: the hash of tensor i runs while tensor i + 1 is
    read. Both ``readinto`` and xxh3 release the GIL, so a verified restore costs about one read
    instead of a read plus a hash."""

    def __init__(self, like: str | None) -> None:
        self._hasher = hasher_like(like)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
        self._last: Future[None] | None = None

    def update(self, data: Any) -> None:
        self._last = self._pool.submit(self._hasher.update, data)  # one worker: runs in order

    def hexdigest(self) -> str:
        try:
            if self._last is not None:
                self._last.result()
            return self._hasher.hexdigest()
        finally:
            self._pool.shutdown(wait=True)


def checksum_file(storage: Storage, path: str, chunk: int = 8 << 20, *, like: str | None = None) -> FileRecord:
    """Size and checksum of a file on storage (for ``verify`` and plain files). A local file is
    mapped and hashed on every core; elsewhere it is read in ``chunk``-byte reads. ``like``: a
    recorded digest, to compute one of the same scheme (checkpoints from before the chunked one)."""
    local = storage.local_path(path)
    if local is not None and _CAN_MAP:
        with open(local, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
                    return FileRecord(size=size, xxh3_64=hash_mapping(mapped, size, like=like))
    hasher = hasher_like(like)
    size = 0
    with storage.open_read(path) as f:
        while block := f.read(chunk):
            hasher.update(block)
            size += len(block)
    return FileRecord(size=size, xxh3_64=hasher.hexdigest())


class HashingWriter:
    """Wraps a file being written: every ``write`` also feeds xxh3 and counts bytes, so a file
    written by a third-party writer (``torch.save``) needs no second read to be checksummed.

    If the writer seeks or truncates, the running hash no longer describes the file; ``record()``
    then returns None and the caller checksums the finished file instead.
    """

    def __init__(self, file: Any) -> None:
        self._file = file
        self._hasher = FileHasher()
        self._size = 0
        self._sequential = True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self._file.write(view)
        self._hasher.update(view)
        self._size += len(view)
        return int(written) if written is not None else len(view)

    def seek(self, *args: Any) -> int:
        self._sequential = False
        return int(self._file.seek(*args))

    def truncate(self, *args: Any) -> int:
        self._sequential = False
        return int(self._file.truncate(*args))

    def tell(self) -> int:
        return int(self._file.tell())

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._file, attr)

    def record(self) -> FileRecord | None:
        return FileRecord(self._size, self._hasher.hexdigest()) if self._sequential else None
