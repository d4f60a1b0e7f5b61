"""Reading a checkpoint given its location: ours (manifest + tensor files) or a foreign format.

Both paths end in the same :mod:`restore` pipeline (select, rename, read only what is needed,
load into a target), so partial and tolerant restores behave the same for every format.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt_plugins.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.files.tensor_file import read_tensor_file
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.restore.choose import first_usable
from ckpt_plugins.restore.select import Selector, materialize
from ckpt_plugins.restore.targets import RestoreReport, load_into
from ckpt_plugins.sharded.read import ChunkReader, resolve_all
from ckpt_plugins.storage import Storage, open_storage
from ckpt_plugins.tree.codec import flatten_state, leaf_paths
from ckpt_plugins.tree.tags import TAG
from ckpt_plugins.tree.walk import iter_leaves

__all__ = ["is_our_checkpoint", "read_rank_state", "restore_ours", "restore_path", "restore_which"]

log = logging.getLogger(__name__)


def is_our_checkpoint(storage: Storage, path: str) -> bool:
    return storage.isdir(path) and storage.exists(storage.join(path, MANIFEST_NAME))


def restore_ours(
    storage: Storage,
    layout: Layout,
    path: str,
    *,
    target: Any,
    selector: Callable[[str], bool] | None,
    rename: Mapping[str, str] | None,
    strict: bool,
    map_location: str | torch.device,
    allow_unsafe_pickle: bool,
    verify: bool,
    part: str = "state",
    missing_ok: bool = False,
) -> tuple[Any, RestoreReport]:
    """Restore one part of one of our checkpoint folders (raises CorruptCheckpointError)."""
    manifest = layout.read_manifest(path)
    report = RestoreReport(source=path, step=manifest.step)
    if part not in manifest.parts:
        if missing_ok:
            return None, report
        raise CorruptCheckpointError(f"{storage.join(path, MANIFEST_NAME)}: has no part {part!r}")
    entry = manifest.parts[part]
    listed = [storage.join(path, name) for name in manifest.files]
    listed += [layout.shared.path(name) for name in manifest.shared_files]  # dedup (docs/dedup.md)
    for file_path in listed:  # a missing file is damage even when this part does not need it
        if not storage.exists(file_path):
            raise CorruptCheckpointError(f"{file_path}: file listed in the manifest is missing")

    chunks = ChunkReader(storage, path, manifest.sharded, verify=verify) if manifest.sharded is not None else None

    def read_tensors(keys: set[str] | None) -> Mapping[str, torch.Tensor]:
        refs: dict[str, Any] = chunks.refs(keys) if chunks is not None and part == "state" else {}
        if keys is not None:
            keys = keys - refs.keys()
        if entry.shared and keys != set():  # dedup: the shared pool (docs/dedup.md)
            from ckpt_plugins.dedup.read import read_shared

            shared = read_shared(layout.shared, manifest, entry, keys, verify=verify, map_location=map_location)
            return {**shared, **refs}
        if entry.tensor_file is None or keys == set():
            return refs
        file_path = storage.join(path, entry.tensor_file)
        expected = manifest.files[entry.tensor_file] if verify else None
        plain = read_tensor_file(storage, file_path, keys=keys, expected=expected, map_location=map_location)
        return {**plain, **refs}

    tree = entry.tree
    reader: Callable[[set[str] | None], Mapping[str, torch.Tensor]] = read_tensors
    native_paths: list[str] = []
    if part == "state":
        tree, reader, native_paths = _with_native_files(
            storage, path, manifest, tree, read_tensors, selector, map_location, verify
        )
    if isinstance(selector, Selector):
        selector.check(leaf_paths(entry.tree) + native_paths)
    state = materialize(tree, reader, selector=selector, rename=rename, report=report)
    _finish(state, target, strict, report)
    if chunks is not None:
        state = resolve_all(state)  # sharded tensors no target claimed: read in full
        report.bytes_read += chunks.bytes_read
    return state, report


def _with_native_files(
    storage: Storage,
    path: str,
    manifest: Any,
    tree: Any,
    read_tensors: Callable[[set[str] | None], Mapping[str, torch.Tensor]],
    selector: Callable[[str], bool] | None,
    map_location: str | torch.device,
    verify: bool,
) -> tuple[Any, Callable[[set[str] | None], Mapping[str, torch.Tensor]], list[str]]:
    """Our HF checkpoints also hold the Trainer's own files (weights, optimizer, scheduler, RNG,
    trainer_state.json): add them to the state tree beside the manifest's own keys, so that
    selection, renames and strict checks treat both alike. Also returns every key path of those files
    (selected or not), for the selector's check. Other checkpoints are returned as they are."""
    from ckpt_plugins.formats.hf_folder import read_native_files

    seen: list[str] = []

    def probe(key_path: str) -> bool:
        seen.append(key_path)
        return selector(key_path)  # type: ignore[misc]

    native = read_native_files(
        storage, path, manifest, map_location=map_location, include=None if selector is None else probe, verify=verify
    )
    if not native or type(tree) is not dict or TAG in tree:
        return tree, read_tensors, seen
    flat = flatten_state(native)
    if type(flat.tree) is not dict or set(flat.tree) & set(tree):
        return tree, read_tensors, seen
    in_memory = flat.tensors

    def read_both(keys: set[str] | None) -> Mapping[str, torch.Tensor]:
        own = read_tensors(None if keys is None else {k for k in keys if k not in in_memory})
        return {**own, **in_memory}

    return {**tree, **flat.tree}, read_both, seen


def restore_which(
    storage: Storage,
    layout: Layout,
    which: Any,
    *,
    candidates: Callable[[str], list[int]],
    directory: str,
    verify: bool,
    **options: Any,
) -> tuple[Any, RestoreReport, int | None]:
    """``CheckpointManager.restore``: ``"latest"``/``"best"`` (``candidates(which)``, best first,
    falling back past damaged ones), a committed step, or a path (ours or foreign).

    Returns the state, the report, and the committed step that was loaded (None for a path).
    """

    def attempt(step: int) -> tuple[Any, RestoreReport, int | None]:
        copies = layout.copies(step)  # a mirror: the local copy first, then the remote one
        for i, (where, path) in enumerate(copies):
            try:
                state, report = restore_ours(where.storage, where, path, verify=verify, **options)
            except CorruptCheckpointError as exc:
                if i + 1 == len(copies):
                    raise
                log.warning("%s; reading step %d from %s instead", exc, step, copies[i + 1][1])
                continue
            report.step = step
            log.info(report.summary())
            return state, report, step
        raise AssertionError("unreachable: copies() is never empty")

    if isinstance(which, str) and which in ("latest", "best"):
        return first_usable(candidates(which), attempt, what=which, directory=directory)
    if isinstance(which, int) and not isinstance(which, bool):
        where, path = layout.copies(which)[0]
        if not where.storage.exists(where.storage.join(path, MANIFEST_NAME)):
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {which} in {directory}; "
                f"available steps: {[c.step for c in layout.committed()]}"
            )
        return attempt(which)
    if isinstance(which, (str, os.PathLike)):
        state, report = restore_path(os.fspath(which), **options, verify=verify)
        return state, report, None
    raise ConfigError(f"restore() takes 'latest', 'best', a step (int) or a path, got {which!r}")


def read_rank_state(
    storage: Storage, layout: Layout, path: str, rank: int, *, verify: bool, map_location: str | torch.device
) -> Any:
    """The ``rank_state`` of ``rank`` in our checkpoint at ``path``; None when it has none for that rank."""
    state, _ = restore_ours(
        storage,
        layout,
        path,
        verify=verify,
        part=f"rank_{rank}",
        target=None,
        selector=None,
        rename=None,
        strict=True,
        map_location=map_location,
        allow_unsafe_pickle=False,
        missing_ok=True,
    )
    return state


def restore_path(
    path: str,
    *,
    target: Any,
    selector: Callable[[str], bool] | None,
    rename: Mapping[str, str] | None,
    strict: bool,
    map_location: str | torch.device,
    allow_unsafe_pickle: bool,
    verify: bool,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Any, RestoreReport]:
    """Restore from an explicit path: one of our folders, or a foreign file/folder
    (``storage_options``: for a URL, its fsspec options)."""
    storage, root = open_storage(path, storage_options)
    if is_our_checkpoint(storage, root):
        parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else root
        return restore_ours(
            storage,
            Layout(storage, parent),
            root,
            target=target,
            selector=selector,
            rename=rename,
            strict=strict,
            map_location=map_location,
            allow_unsafe_pickle=allow_unsafe_pickle,
            verify=verify,
        )
    if storage.local_path(root) is None:
        raise CheckpointNotFoundError(
            f"{path}: no {MANIFEST_NAME} there; foreign formats are read from local paths only"
        )
    from ckpt_plugins.formats import detect_format, read_foreign

    seen: list[str] = []  # every key path the reader asked about: what the checkpoint holds

    def probe(key_path: str) -> bool:
        seen.append(key_path)
        return selector is None or selector(key_path)

    obj = read_foreign(
        root,
        map_location=map_location,
        allow_unsafe_pickle=allow_unsafe_pickle,
        include=None if selector is None else probe,
    )
    if isinstance(selector, Selector):
        selector.check(seen)
    report = RestoreReport(source=os.fspath(path), format=detect_format(root) or "unknown")
    if selector is None and not rename:
        state = obj
        report.tensors_read = sum(1 for _, leaf in iter_leaves(obj) if isinstance(leaf, torch.Tensor))
    else:
        flat = flatten_state(obj)
        state = materialize(flat.tree, lambda keys: flat.tensors, selector=selector, rename=rename, report=report)
    _finish(state, target, strict, report)
    return state, report


def _finish(state: Any, target: Any, strict: bool, report: RestoreReport) -> None:
    if target is not None:
        load_into(target, state, strict=strict, report=report)
