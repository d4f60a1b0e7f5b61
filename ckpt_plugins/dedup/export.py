"""A self-contained copy of one checkpoint: shared (dedup) tensors written into its own folder.

A dedup checkpoint's folder holds the manifest and reads its state tensors from the directory's
``.shared/`` pool; copying the folder alone loses them. :func:`export_checkpoint` writes a new
checkpoint folder that holds every byte it needs (``state.safetensors`` instead of references;
the other files copied and checked), committed as a save is (hidden folder, manifest last,
rename; the object-store protocol on ``s3://``). Used by ``ckpt-plugins export``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ckpt_plugins.dedup.read import read_shared
from ckpt_plugins.errors import ConfigError, CorruptCheckpointError
from ckpt_plugins.files.manifest import Manifest, Part
from ckpt_plugins.files.tensor_file import FileRecord, HashingWriter, read_tensor_file, write_tensor_file
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.storage import Storage, open_storage

__all__ = ["export_checkpoint"]

log = logging.getLogger(__name__)

_CHUNK = 16 << 20


def _split(path: str) -> tuple[str, str]:
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    return parent or ".", name


def export_checkpoint(src: str, dst: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Write checkpoint ``src`` (ours) as the self-contained checkpoint folder ``dst`` (paths or
    fsspec URLs; ``storage_options`` go to their file systems, as for ``CheckpointManager``).

    Raises:
        CorruptCheckpointError: ``src`` does not verify (a damaged shared file included).
        ConfigError: ``dst`` exists already.
    """
    storage, root = open_storage(os.fspath(src), storage_options)
    parent, _ = _split(root)
    source = Layout(storage, parent)
    problems = source.verify(root)
    if problems:
        raise CorruptCheckpointError(f"{src} does not verify, nothing was exported: " + "; ".join(problems[:3]))
    manifest = source.read_manifest(root)
    out_storage, out_root = open_storage(os.fspath(dst), storage_options)
    if out_storage.exists(out_root):
        raise ConfigError(f"{dst} exists already; export writes a new checkpoint folder (pick another name)")
    out_parent, name = _split(out_root)
    out_storage.makedirs(out_parent)
    target = Layout(out_storage, out_parent)
    temp = target.new_temp_dir(manifest.step, name=name)
    try:
        out_storage.makedirs(temp)
        files: dict[str, FileRecord] = {}
        for file_name, record in manifest.files.items():
            files[file_name] = _copy(
                storage, storage.join(root, file_name), out_storage, out_storage.join(temp, file_name)
            )
            if files[file_name] != record:
                raise CorruptCheckpointError(f"{storage.join(root, file_name)} changed while it was copied")
        parts: dict[str, Part] = {}
        for part_name, part in manifest.parts.items():
            if not part.shared:
                parts[part_name] = part
                continue
            tensors = dict(read_shared(source.shared, manifest, part, None, verify=True))
            if part.tensor_file is not None:
                own = storage.join(root, part.tensor_file)
                tensors.update(read_tensor_file(storage, own, expected=manifest.files[part.tensor_file]))
            file_name = f"{part_name}.safetensors"
            while file_name in files:
                file_name = f"_{file_name}"
            files[file_name] = write_tensor_file(out_storage, out_storage.join(temp, file_name), tensors)
            parts[part_name] = Part(part.tree, file_name)
        exported = replace(manifest, files=files, parts=parts, shared_files={})
        target.commit(temp, exported, name=name)
    except BaseException:
        target.discard(temp)
        raise
    log.info("exported step %d from %s to %s (self-contained)", manifest.step, src, dst)
    return exported


def _copy(storage: Storage, src: str, out_storage: Storage, dst: str) -> FileRecord:
    with storage.open_read(src) as f, out_storage.open_write(dst) as raw:
        out = HashingWriter(raw)
        while chunk := f.read(_CHUNK):
            out.write(chunk)
    record = out.record()
    assert record is not None  # written sequentially
    return record
