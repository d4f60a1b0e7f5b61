"""What a dedup save writes and what it refers to.

A tensor of the state whose bytes equal those of the same key in the previous committed
checkpoint is not written again: the manifest refers to the shared pool file that already holds
it (:mod:`ckpt_plugins.layout.shared`). Equality is decided twice, cheaply first:

1. on the training thread, at ``save()``: a tensor whose storage, offset, shape, stride, dtype and
   version counter are those it had at the last committed save has not been written to since
   (every in-place change, ``optimizer.step()`` included, moves the counter), so it is neither
   copied nor hashed: a frozen backbone adds nothing to the stall. Only when no save is in flight
   (the previous one committed), since its references must be known;
2. on the writer, for every other tensor: its xxh3 digest (dtype, shape, bytes) against the
   digest recorded in the previous manifest.

The rest goes into one new pool file per save. The index is this manager's memory of the last
committed state part (key -> pool file, digest) and of the version signatures taken at that save;
it pins the pool files it names, and every save in flight reserves what it refers to, so garbage
collection (which holds the same lock) never removes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_plugins.dedup.digest import tensor_digest
from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.files.manifest import Manifest
from ckpt_plugins.files.tensor_file import FileRecord
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.tree.codec import FlatState

__all__ = ["DedupIndex", "DedupPlan", "open_index"]

log = logging.getLogger(__name__)

Ref = tuple[str, str]  # (pool file, digest)


def _signature(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        tensor.device,
        tensor._version,
    )


@dataclass
class DedupPlan:
    """One save's dedup decisions (made at ``save()``, completed on the writer)."""

    index: DedupIndex
    step: int
    token: str
    known: dict[str, Ref]
    """Keys not copied at all: unchanged version counter since the last committed save."""
    signatures: dict[str, tuple[torch.Tensor, tuple[Any, ...]]]
    reserved: list[str] = field(default_factory=list)
    bytes_written: int = 0
    """Tensor bytes this save wrote into the pool (the changed tensors)."""
    bytes_referenced: int = 0

    def write(
        self, dest: Any, tensors: Mapping[str, torch.Tensor], slot: int | None
    ) -> tuple[dict[str, Ref], dict[str, FileRecord]]:
        """On the writer: digest ``tensors`` (the staged state tensors that were not ``known``),
        write the changed ones into a new pool file, and return the part's ``shared`` map and the
        ``shared_files`` records of every pool file it names."""
        index = self.index
        pool = index.layout.shared
        with index.lock:
            previous, records = dict(index.entries), dict(index.files)
        shared: dict[str, Ref] = dict(self.known)
        changed: dict[str, torch.Tensor] = {}
        digests: dict[str, str] = {}
        for key, tensor in tensors.items():
            digest = tensor_digest(tensor)
            if previous.get(key, ("", ""))[1] == digest:
                shared[key] = previous[key]
                self.bytes_referenced += tensor.numel() * tensor.element_size()
            else:
                changed[key], digests[key] = tensor, digest
        name = f"{self.step}-{self.token}.safetensors"
        self.reserved = sorted({n for n, _ in shared.values()} | {name})
        pool.reserve(self.reserved)
        files: dict[str, FileRecord] = {}
        if changed:
            storage = dest.storage
            storage.makedirs(pool.dir)
            files[name] = dest.write_tensors(pool.path(name), changed, None, slot)
            storage.fsync_dir(pool.dir)  # the file's name is durable before the manifest names it
            shared.update({k: (name, digests[k]) for k in changed})
            self.bytes_written = sum(t.numel() * t.element_size() for t in changed.values())
        for other in {n for n, _ in shared.values()} - set(files):
            if other not in records:
                raise CorruptCheckpointError(f"dedup: shared file {other!r} is not listed by the previous checkpoint")
            files[other] = records[other]
        return shared, files


class DedupIndex:
    """Rank 0's dedup memory for one directory (see the module docstring)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.lock = layout.shared.lock
        self.entries: dict[str, Ref] = {}
        self.files: dict[str, FileRecord] = {}
        self._signatures: dict[str, tuple[torch.Tensor, tuple[Any, ...]]] = {}
        self._pending = 0
        self._pinned: list[str] = []
        self._loaded = False

    def _load(self) -> None:
        """The newest committed checkpoint's shared map (a run resumed in a new process)."""
        self._loaded = True
        committed = self.layout.committed()
        if not committed:
            return
        try:
            manifest = self.layout.read_manifest(committed[-1].path)
        except CorruptCheckpointError as exc:
            log.warning("dedup: %s; the next save writes every tensor", exc)
            return
        self._adopt(manifest)

    def _adopt(self, manifest: Manifest) -> None:
        part = manifest.parts.get("state")
        shared = dict(part.shared or {}) if part is not None else {}
        self.entries = shared
        self.files = {n: manifest.shared_files[n] for n in {n for n, _ in shared.values()}}
        pool = self.layout.shared
        pool.release(self._pinned)
        self._pinned = sorted(self.files)
        pool.reserve(self._pinned)

    def plan(self, step: int, token: str, flat: FlatState) -> tuple[FlatState, DedupPlan]:
        """On the training thread: the state to stage (without the ``known`` tensors) and the plan."""
        with self.lock:
            if not self._loaded:
                self._load()
            known: dict[str, Ref] = {}
            if self._pending == 0:
                for key, tensor in flat.tensors.items():
                    seen = self._signatures.get(key)
                    if seen is not None and key in self.entries and seen[1] == _signature(tensor):
                        known[key] = self.entries[key]
            self._pending += 1
            self.layout.shared.reserve(n for n, _ in known.values())
        signatures = {k: (t, _signature(t)) for k, t in flat.tensors.items()}
        plan = DedupPlan(self, step, token, known, signatures)
        plan.bytes_referenced = sum(flat.tensors[k].numel() * flat.tensors[k].element_size() for k in known)
        staged = FlatState(flat.tree, {k: v for k, v in flat.tensors.items() if k not in known})
        return staged, plan

    def finished(self, plan: DedupPlan, manifest: Manifest | None) -> None:
        """On the writer, before retention: adopt the committed manifest (or keep the old state)."""
        with self.lock:
            if manifest is not None:
                self._adopt(manifest)
                self._signatures = plan.signatures
            self._pending -= 1
            pool = self.layout.shared
            pool.release(plan.reserved)
            pool.release(n for n, _ in plan.known.values())

    def close(self) -> None:
        with self.lock:
            self.layout.shared.release(self._pinned)
            self._pinned, self._signatures = [], {}


def open_index(options: Any, layout: Layout, directory: str) -> DedupIndex | None:
    """The manager's index when ``dedup`` is on (rank 0); refuses what it cannot work with."""
    if not options.io.dedup or options.io.read_only:
        return None
    from ckpt_plugins.errors import ConfigError

    clash = [
        (name, why)
        for name, on, why in (
            (
                "mirror",
                getattr(getattr(options, "mirror", None), "mirror", None) is not None,
                "uploads copy checkpoint folders only",
            ),
            ("writer", options.saving.writer == "process", "the writer process writes whole staged files"),
        )
        if on
    ]
    if clash:
        name, why = clash[0]
        raise ConfigError(
            f"$dedup=True does not work with ${name} yet ({why}); drop one of them for {directory}",
            option="dedup",
            value=True,
            mentions=(name,),
        )
    return DedupIndex(layout)
