"""One checkpoint as one file: a safetensors file that carries its own state tree and checksum.

Frameworks that address checkpoints by file path (Lightning's ``CheckpointIO``: ``epoch=3.ckpt``,
``last.ckpt``) expect a *file* there: ``os.path.isfile``, copying, uploading and serving it all
assume one. This format keeps our guarantees in that shape:

* It is a plain safetensors file (``safetensors.safe_open`` reads its tensors). Its header
  metadata holds ``format`` (:data:`FORMAT`), ``format_version``, the state tree (``tree``, the
  JSON from :func:`~ckpt_plugins.tree.codec.flatten_state`), ``info`` (step, wall time, library
  versions, user metadata) and ``data_xxh3_64``, the xxh3 of the data section. The checksum covers
  the tensor bytes, so it can sit in the header it does not cover; the header itself is validated
  field by field when read. Loading never runs pickle.
* It is committed like a checkpoint folder: written under a hidden temporary name in the same
  directory (:func:`temp_path`), fsynced, renamed over the final name, the directory fsynced. A
  reader sees the old file or the new one, never a mix. Temporary names do not contain the final
  name, its digits or its suffix, so scans that parse checkpoint names (Lightning's
  ``hpc_ckpt_<N>`` version scan, ``*.ckpt`` globs, ``"last" in name``) never pick one up.
* :func:`reserve` puts a small marker file at a final name that does not exist yet, so code that
  chooses a free name by checking what exists (Lightning's ``-vN`` suffixes) sees a save that is
  still being written. A reader that finds a marker raises
  :class:`~ckpt_plugins.errors.CheckpointNotFoundError` saying the save never committed. Such a
  save is then written in place (``in_place=True``): the name holds nothing older to protect, and
  an incomplete file fails its size or checksum check with an error naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import xxhash

from ckpt_plugins.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt_plugins.files.tensor_file import (
    FileRecord,
    file_order,
    read_header,
    read_tensor_file,
    tensor_bytes,
    write_tensor_file,
)
from ckpt_plugins.layout.lock import process_alive
from ckpt_plugins.storage.base import Storage

__all__ = [
    "FORMAT",
    "TEMP_PREFIX",
    "is_reservation",
    "is_single_file",
    "read_single_file",
    "remove_stale_temp_files",
    "reserve",
    "temp_path",
    "write_single_file",
]

log = logging.getLogger(__name__)

FORMAT = "ckpt_plugins.single_file"
FORMAT_VERSION = 1
TEMP_PREFIX = ".partial-"  # no "ckpt_" (Lightning's version scan), ".ckpt" or "last" in temporary names
_TEMP_NAME = re.compile(r"^\.partial-([0-9a-f]{8})-([0-9a-f]+)-[0-9a-f]{12}$")
_HEAD = b'{"__metadata__":{"format":"' + FORMAT.encode() + b'"'
_RESERVED = b"ckpt_plugins: reserved by a save in progress; "
TensorWriter = Callable[[str, Mapping[str, torch.Tensor], dict[str, str]], FileRecord]
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


def temp_path(storage: Storage, path: str) -> str:
    """A hidden name beside ``path`` to write it under: host, pid and a random token, in hex (so
    no digit or letter of the final name is in it)."""
    parent = _parent(path)
    return storage.join(parent, f"{TEMP_PREFIX}{_HOST}-{os.getpid():x}-{uuid.uuid4().hex[:12]}")


def reserve(storage: Storage, path: str) -> bool:
    """Put a marker at ``path`` if nothing is there; True if it did (see the module docstring)."""
    local = storage.local_path(path)
    if local is not None:
        try:
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(_RESERVED + f"host {_HOST} pid {os.getpid()}\n".encode())
        return True
    marker = _RESERVED + f"host {_HOST} pid {os.getpid()}\n".encode()
    create_exclusive = getattr(storage, "create_exclusive", None)
    if create_exclusive is not None:  # an object store: a conditional create (If-None-Match: *)
        return bool(create_exclusive(path, marker))
    if storage.exists(path):
        return False
    with storage.open_write(path) as f:
        f.write(marker)
    return True


def is_reservation(storage: Storage, path: str) -> bool:
    """Whether ``path`` holds a :func:`reserve` marker (a save that has not committed)."""
    try:
        if storage.isdir(path) or storage.size(path) > 200:
            return False
        with storage.open_read(path) as f:
            return f.read(len(_RESERVED)) == _RESERVED
    except OSError:
        return False


def is_single_file(storage: Storage, path: str) -> bool:
    """Whether ``path`` is a file in this format (checks the first bytes only)."""
    try:
        if storage.isdir(path):
            return False
        with storage.open_read(path) as f:
            head = f.read(8 + len(_HEAD))
    except OSError:
        return False
    return len(head) == 8 + len(_HEAD) and head[8:] == _HEAD


def _data_checksum(tensors: Mapping[str, torch.Tensor], order: list[str]) -> str:
    hasher = xxhash.xxh3_64()
    for key in order:
        hasher.update(tensor_bytes(tensors[key]))
    return hasher.hexdigest()


def write_single_file(
    storage: Storage,
    path: str,
    tree: Any,
    tensors: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    *,
    direct_io: bool = True,
    in_place: bool = False,
    write_tensors: TensorWriter | None = None,
) -> FileRecord:
    """Write one checkpoint file atomically (hidden temporary name, fsync, rename, fsync dir).

    Args:
        storage: where ``path`` lives.
        path: the final file name; replaced atomically if it exists (a :func:`reserve` marker
            included).
        tree: the state tree (strict JSON) describing how ``tensors`` rebuild the state.
        tensors: contiguous CPU tensors by key.
        info: JSON-able facts about the checkpoint (step, user metadata, ...).
        direct_io: write the data with ``O_DIRECT`` where the file system allows it.
        in_place: write straight into ``path``, which holds this save's own :func:`reserve`
            marker (a new name: there is no earlier file to keep intact, and no temporary file
            shows up beside it); a failure removes what was written.
        write_tensors: ``fn(path, tensors, metadata)`` that writes the tensor file instead of
            :func:`~ckpt_plugins.files.tensor_file.write_tensor_file` (a writer process).

    Returns:
        The written file's size and whole-file xxh3.
    """
    from ckpt_plugins import __version__

    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "data_xxh3_64": _data_checksum(tensors, file_order(tensors)),
        "tree": json.dumps(tree, allow_nan=False, separators=(",", ":")),
        "info": json.dumps(
            {"wall_time": time.time(), "created_by": {"ckpt_plugins": __version__, "torch": torch.__version__}, **info},
            allow_nan=False,
            separators=(",", ":"),
        ),
    }
    # An object store has no rename, but needs none: one object appears whole at the end of its
    # upload, and a failed upload is aborted, leaving the old object (ckpt_plugins.storage.object_store).
    whole_object = not getattr(storage, "atomic_rename", True)
    temp = path if in_place or whole_object else temp_path(storage, path)
    try:
        if write_tensors is not None:
            record = write_tensors(temp, tensors, metadata)
        else:
            record = write_tensor_file(storage, temp, tensors, metadata, direct_io=direct_io)
        if temp != path:
            _replace(storage, temp, path)
    except BaseException:
        try:
            if (temp != path or in_place) and storage.exists(temp):
                storage.remove_file(temp)
        except OSError:
            pass
        raise
    storage.fsync_dir(_parent(path))
    return record


def read_single_file(
    storage: Storage, path: str, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Read a file written by :func:`write_single_file`: ``(state, info)``.

    Raises:
        CheckpointNotFoundError: nothing at ``path``, or only a :func:`reserve` marker.
        CorruptCheckpointError: the header is malformed or (``verify``) the data does not match
            its checksum; the message names the file.
    """
    from ckpt_plugins.tree.codec import unflatten_state

    if not storage.exists(path):
        raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
    if is_reservation(storage, path):
        raise CheckpointNotFoundError(
            f"{path} holds only the name reservation of a save that never committed (the process saving it "
            "ended first); delete it and load an earlier checkpoint"
        )
    size = storage.size(path)
    with storage.open_read(path) as f:
        try:
            entries, data_start = read_header(f, path, size)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(
                f"{exc}. If the process saving it ended while writing it, delete it and load an earlier checkpoint"
            ) from exc
        f.seek(8)
        try:
            metadata = json.loads(f.read(data_start - 8)).get("__metadata__") or {}
            tree, info = json.loads(metadata["tree"]), json.loads(metadata["info"])
            expected, version = metadata["data_xxh3_64"], int(metadata["format_version"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{path}: the {FORMAT} header metadata is malformed ({exc!r})") from exc
    if metadata.get("format") != FORMAT or version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path}: format {metadata.get('format')!r} version {version} is not "
            f"{FORMAT} <= {FORMAT_VERSION}; upgrade ckpt_plugins to read it"
        )
    tensors = read_tensor_file(storage, path)
    if verify:
        digest = _data_checksum(tensors, sorted(entries, key=lambda k: entries[k][2]))
        if digest != expected:
            raise CorruptCheckpointError(
                f"{path}: checksum mismatch (xxh3 {digest}, header says {expected}); the file is damaged"
            )
    if torch.device(map_location) != torch.device("cpu"):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return unflatten_state(tree, tensors), info if isinstance(info, dict) else {}


def remove_stale_temp_files(storage: Storage, directory: str) -> list[str]:
    """Remove temporary files left in ``directory`` by processes of this host that have ended."""
    removed = []
    for name in storage.listdir(directory):
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        host, pid = match.group(1), int(match.group(2), 16)
        if host != _HOST or process_alive(pid):
            continue
        try:
            storage.remove_file(storage.join(directory, name))
            removed.append(name)
        except OSError as exc:
            log.warning("could not remove the leftover %s (%s)", storage.join(directory, name), exc)
    if removed:
        log.info("removed %d leftover temporary file(s) of ended processes in %s", len(removed), directory)
    return removed


def _parent(path: str) -> str:
    if "://" in path:
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def _replace(storage: Storage, src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` (atomic on local file systems)."""
    local_src, local_dst = storage.local_path(src), storage.local_path(dst)
    if local_src is not None and local_dst is not None:
        os.replace(local_src, local_dst)
        return
    if storage.exists(dst):
        storage.remove_file(dst)
    storage.rename(src, dst)
