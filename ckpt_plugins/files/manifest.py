"""The manifest: the one file that makes a checkpoint folder a checkpoint.

It is written last, so its presence means every other file was complete and fsynced. It holds the
format version, the step, metrics, wall time, library and torch versions, the state tree (how to
rebuild the nested state from the tensor files) and every file's size and checksum (:mod:`.checksum`).

Manifests are read from disk that may be damaged or hostile, so :func:`parse_manifest` checks
every field's type and rejects file names that could leave the checkpoint folder. Older format
versions are upgraded by the migrations registered in :data:`MIGRATIONS`, one version at a time.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.checksum import DIGEST_PATTERN, is_chunked
from ckpt_plugins.files.tensor_file import PENDING_CHECKSUM, FileRecord
from ckpt_plugins.sharded.format import parse_sharded

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MIGRATIONS",
    "Manifest",
    "Part",
    "dump_manifest",
    "parse_manifest",
    "written_version",
]

FORMAT_NAME = "ckpt_plugins"
FORMAT_VERSION = 4
"""Version 3 adds optional sections: ``sharded`` (docs/sharded.md) and the dedup fields
(``shared_files``, a part's ``shared``: docs/format.md). Version 4 records chunked checksums
(:mod:`.checksum`: ``tree24:<hex>``, verified on every core), which older readers could not
check. A manifest is written with the lowest version that describes it (see
:func:`written_version`), so one without chunked checksums or version-3 sections is version 2."""
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 1 << 50
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")
# A file of a checkpoint overwritten on an object store lives under one version folder
# (``v<12 hex>/name``: see ckpt_plugins.layout.object_commit); nothing else may contain a "/".
_VERSIONED_NAME = re.compile(r"^v[0-9a-f]{12}/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")


@dataclass(frozen=True)
class Part:
    """One state tree and the tensor file that holds its tensors (None when it has none)."""

    tree: Any
    tensor_file: str | None
    shared: dict[str, tuple[str, str]] | None = None
    """Dedup (format version 3): tensor key -> (file in the directory's ``.shared/`` pool that
    holds it, the tensor's xxh3 digest). Keys listed here are not in ``tensor_file``."""


@dataclass(frozen=True)
class Manifest:
    """Everything known about one committed checkpoint."""

    step: int
    parts: dict[str, Part]
    files: dict[str, FileRecord]
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)
    world_size: int = 1
    created_by: dict[str, str] = field(default_factory=dict)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    retention: dict[str, Any] | None = None
    """The run's retention flags when it saved (``keep_last``, ``keep_best``, ``monitor``, ``mode``,
    ``keep_every_n_steps``, ``keep_time_interval``); ``None`` in manifests written before they were
    stored, or for a policy no flags describe. Optional: older readers ignore it."""
    sharded: Any = None
    """The sharded tensors (a :class:`~ckpt_plugins.sharded.format.ShardedIndex`), or None."""
    shared_files: dict[str, FileRecord] = field(default_factory=dict)
    """Dedup: the ``.shared/`` pool files this checkpoint reads (size and xxh3, as ``files``)."""


def dump_manifest(manifest: Manifest) -> bytes:
    """Serialise a manifest to strict JSON (NaN metrics become the string "nan")."""
    from ckpt_plugins import __version__

    doc = {
        "format": FORMAT_NAME,
        "format_version": written_version(manifest.files, manifest.shared_files, manifest.sharded),
        "step": manifest.step,
        "wall_time": manifest.wall_time,
        "metrics": {k: _encode_float(v) for k, v in manifest.metrics.items()},
        "world_size": manifest.world_size,
        "created_by": manifest.created_by or {"ckpt_plugins": __version__, "torch": torch.__version__},
        "parts": {name: _dump_part(p) for name, p in manifest.parts.items()},
        "files": {name: {"size": r.size, "xxh3_64": r.xxh3_64} for name, r in manifest.files.items()},
        "user_metadata": manifest.user_metadata,
    }
    if manifest.retention is not None:
        doc["retention"] = manifest.retention
    if manifest.sharded is not None:
        doc["sharded"] = manifest.sharded.to_json()
    if manifest.shared_files:
        doc["shared_files"] = {n: {"size": r.size, "xxh3_64": r.xxh3_64} for n, r in manifest.shared_files.items()}
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


def written_version(files: dict[str, FileRecord], shared_files: dict[str, FileRecord], sharded: Any) -> int:
    """The lowest format version that describes a manifest with these files and sections."""
    if any(is_chunked(r.xxh3_64) for r in (*files.values(), *shared_files.values())):
        return 4
    return 3 if sharded is not None or shared_files else 2


def _dump_part(part: Part) -> dict[str, Any]:
    doc: dict[str, Any] = {"tree": part.tree, "tensor_file": part.tensor_file}
    if part.shared:  # grouped by pool file: {file: {key: digest}}
        grouped: dict[str, dict[str, str]] = {}
        for key, (name, digest) in part.shared.items():
            grouped.setdefault(name, {})[key] = digest
        doc["shared"] = grouped
    return doc


def _encode_float(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf"


def _decode_float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CorruptCheckpointError(f"{where}: metric value {value!r} is not a number")
    try:
        return float(value)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: metric value {value!r} is not a number") from exc


# --- migrations --------------------------------------------------------------------------------
# Version 1 (the 0.0.x pre-releases) kept one unnamed state tree at the top level ("tree" and
# "tensor_file") and listed files as [name, size, checksum] triples. Each migration takes the
# document of version N and returns one of version N + 1.


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc["parts"] = {"state": {"tree": doc.pop("tree", None), "tensor_file": doc.pop("tensor_file", None)}}
    files = doc.get("files", [])
    if not isinstance(files, list):
        raise CorruptCheckpointError("version-1 manifest: 'files' must be a list of triples")
    doc["files"] = {}
    for item in files:
        if not (isinstance(item, list) and len(item) == 3):
            raise CorruptCheckpointError(f"version-1 manifest: file entry {item!r} is not [name, size, xxh3]")
        doc["files"][item[0]] = {"size": item[1], "xxh3_64": item[2]}
    doc.setdefault("world_size", 1)
    doc["format_version"] = 2
    return doc


def _v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "format_version": 3}  # version 3 only adds optional sections


def _v3_to_v4(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "format_version": 4}  # version 4 only adds a checksum scheme


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate manifest bytes read from ``where`` (named in every error)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{where}: manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} manifest (no 'format' field)")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"{where}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: format version {version} is newer than this ckpt_plugins understands "
            f"({FORMAT_VERSION}); upgrade ckpt_plugins to read it"
        )
    while version < FORMAT_VERSION:
        doc = MIGRATIONS[version](doc)
        version = doc["format_version"]
    return _build(doc, where)


def _expect(where: str, doc: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise CorruptCheckpointError(f"{where}: manifest field {key!r} has the wrong type ({value!r:.80})")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _check_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not (_SAFE_NAME.match(name) or _VERSIONED_NAME.match(name)) or ".." in name:
        raise CorruptCheckpointError(
            f"{where}: file name {name!r:.80} is not a plain file name; refusing to read outside the checkpoint folder"
        )
    return name


def _build(doc: dict[str, Any], where: str) -> Manifest:
    step = _expect(where, doc, "step", int)
    if step < 0:
        raise CorruptCheckpointError(f"{where}: step {step} is negative")
    files = _file_records(where, _expect(where, doc, "files", dict))
    shared_files = _file_records(where, doc.get("shared_files") or {}, pool=True)
    parts: dict[str, Part] = {}
    for name, part in _expect(where, doc, "parts", dict).items():
        if not isinstance(part, dict) or "tree" not in part:
            raise CorruptCheckpointError(f"{where}: part {name!r} has no tree")
        tensor_file = part.get("tensor_file")
        if tensor_file is not None and _check_name(where, tensor_file) not in files:
            raise CorruptCheckpointError(
                f"{where}: part {name!r} names tensor file {tensor_file!r}, which is not listed"
            )
        parts[name] = Part(tree=part["tree"], tensor_file=tensor_file, shared=_shared(where, part, shared_files))
    metrics_doc = doc.get("metrics") or {}
    if not isinstance(metrics_doc, dict):
        raise CorruptCheckpointError(f"{where}: manifest field 'metrics' is not an object")
    metrics = {str(k): _decode_float(f"{where} [metrics.{k}]", v) for k, v in metrics_doc.items()}
    wall_time = _expect(where, doc, "wall_time", (int, float))
    world_size = _expect(where, doc, "world_size", int)
    created_by = doc.get("created_by") or {}
    user_metadata = doc.get("user_metadata") or {}
    if not isinstance(created_by, dict) or not isinstance(user_metadata, dict):
        raise CorruptCheckpointError(f"{where}: 'created_by' and 'user_metadata' must be objects")
    sharded = parse_sharded(where, doc.get("sharded"), files)
    return Manifest(
        step=step,
        parts=parts,
        files=files,
        metrics=metrics,
        wall_time=float(wall_time),
        world_size=world_size,
        created_by=created_by,
        user_metadata=user_metadata,
        retention=_retention(where, doc.get("retention")),
        sharded=sharded,
        shared_files=shared_files,
        format_version=written_version(files, shared_files, sharded),
    )


def _file_records(where: str, doc: Any, pool: bool = False) -> dict[str, FileRecord]:
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: manifest field 'shared_files' is not an object")
    files: dict[str, FileRecord] = {}
    for name, rec in doc.items():
        if pool and not (isinstance(name, str) and _SAFE_NAME.match(name)):
            raise CorruptCheckpointError(f"{where}: shared file name {name!r:.80} is not a plain file name")
        _check_name(where, name)
        if not isinstance(rec, dict):
            raise CorruptCheckpointError(f"{where}: entry for file {name!r} is not an object")
        size = _expect(f"{where} [{name}]", rec, "size", int)
        digest = _expect(f"{where} [{name}]", rec, "xxh3_64", str)
        checksum_ok = digest == PENDING_CHECKSUM or re.fullmatch(DIGEST_PATTERN, digest)
        if not 0 <= size <= MAX_FILE_BYTES or not checksum_ok:
            raise CorruptCheckpointError(f"{where}: file {name!r} has an absurd size or checksum")
        files[name] = FileRecord(size=size, xxh3_64=digest)
    return files


def _shared(where: str, part: dict[str, Any], shared_files: dict[str, FileRecord]) -> dict[str, tuple[str, str]] | None:
    """A part's ``shared`` map, ``{pool file listed in shared_files: {key: hex digest}}``, as
    key -> (pool file, digest)."""
    doc = part.get("shared")
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: a part's 'shared' field is not an object")
    out: dict[str, tuple[str, str]] = {}
    for name, keys in doc.items():
        if name not in shared_files or not isinstance(keys, dict):
            raise CorruptCheckpointError(f"{where}: a part refers to shared file {name!r:.80}, which is not listed")
        for key, digest in keys.items():
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{1,32}", digest):
                raise CorruptCheckpointError(f"{where}: shared tensor {key!r:.80} has no valid digest ({digest!r:.40})")
            out[str(key)] = (name, digest)
    return out


_RETENTION_TYPES: dict[str, tuple[type, ...]] = {
    "keep_last": (int,),
    "keep_best": (int,),
    "monitor": (str,),
    "mode": (str,),
    "keep_every_n_steps": (int,),
    "keep_time_interval": (int, float),
}


def _retention(where: str, value: Any) -> dict[str, Any] | None:
    """The optional ``retention`` field: known flags with values of their type (or null)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: manifest field 'retention' is not an object ({value!r:.80})")
    out: dict[str, Any] = {}
    for key, types in _RETENTION_TYPES.items():
        flag = value.get(key)
        if flag is not None and (isinstance(flag, bool) or not isinstance(flag, types)):
            raise CorruptCheckpointError(f"{where}: retention flag {key!r} has the wrong type ({flag!r:.80})")
        out[key] = flag
    return out
