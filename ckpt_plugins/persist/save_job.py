"""The part of a save that runs on the background writer: stage, write, commit.

One job per save, run in order by the persist engine. Rank 0 writes the replicated state and the
extra files, waits for every other rank's part (a ``rank_N.part.json`` each rank writes into the
shared temporary folder once its files are complete, or a ``rank_N.error`` marker), writes the
manifest and commits. Other ranks only write their part. A failure removes the temporary folder,
so a failed save leaves nothing behind and deletes nothing.

A job sees only what it needs: the :class:`SaveRequest` (what one ``save()`` call hands over), a
:class:`Destination` (storage, layout, the tensor-file writer, this rank) and the stager whose slot
it holds. What happens after a commit (removing superseded checkpoints, retention, bookkeeping) is
the manager's, through the ``done`` callback the job calls once it has finished, committed or not.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ckpt_plugins.errors import SaveError
from ckpt_plugins.files.extra_files import fill, fill_tensors
from ckpt_plugins.files.manifest import Manifest, Part
from ckpt_plugins.files.tensor_file import FileRecord, HashingWriter, Prehashed, checksum_file, file_head
from ckpt_plugins.layout.commit import Layout
from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.persist.stager import HostStager
from ckpt_plugins.sharded.save import build_index, chunk_records, shard_file_name
from ckpt_plugins.storage.base import Storage
from ckpt_plugins.storage.direct_io import StableWithin, direct_writer

__all__ = ["Destination", "SaveJob", "SaveRequest", "WriteTensors", "file_heads"]

log = logging.getLogger(__name__)


class WriteTensors(Protocol):
    """``write(path, tensors, metadata, slot, prehashed=None)``: write one tensor file, return its
    size and checksum (``prehashed``: the checksum taken while staging, when there is one)."""

    def __call__(
        self,
        path: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        slot: int | None,
        prehashed: Prehashed | None = None,
    ) -> FileRecord: ...


_OWN_FILES = ("state", "rank", "shard")  # key prefixes of the tensor files a job writes itself


def file_heads(
    tensors: Mapping[str, torch.Tensor], extra_specs: Mapping[str, Any], *, dedup: Any = None
) -> dict[str, bytes]:
    """The header of each tensor file a job writes whole from one staged group (``state``,
    ``rank``, ``shard``, ``extra/<name>`` of a tensor extra file), as the job names its tensors:
    what the stager needs to checksum these files while it copies them. Not the state's with
    ``dedup`` (it goes to the shared pool, tensor by tensor)."""
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        head, _, rest = key.partition("/")
        if head in _OWN_FILES:
            split.setdefault(head, {})[rest] = tensor
    if dedup is not None:
        split.pop("state", None)
    heads = {group: file_head(group_tensors) for group, group_tensors in split.items()}
    for name, spec in extra_specs.items():
        if spec[0] == "tensors":
            _, keys, metadata = spec
            named = dict(zip(keys, fill_tensors(name, len(keys), tensors), strict=True))
            heads[f"extra/{name}"] = file_head(named, metadata)
    return heads


@dataclass(frozen=True)
class Destination:
    """Where a job writes and with what (the narrow part of a manager a job needs)."""

    storage: Storage
    layout: Layout
    write_tensors: WriteTensors
    direct_io: bool
    rank: int
    world_size: int
    rank_timeout: float


@dataclass
class SaveRequest:
    """What one ``save()`` call hands to the writer."""

    step: int
    token: str
    name: str | None
    listed: bool
    """A step checkpoint (listed, ordered, retained); False for a named one addressed by path."""
    ranks_with_state: list[int]
    flat: Any
    """This rank's flattened shared state (rank 0), or None."""
    rank_flat: Any
    """This rank's flattened ``rank_state``, or None."""
    tensors: dict[str, torch.Tensor]
    """``state/<key>``, ``rank/<key>`` and extra-file tensors, as handed to ``save()``."""
    staged: Any
    """The staged copy (safe mode), or None: the job stages in overlap mode, or writes ``tensors``."""
    stage_in_job: bool
    slot: int
    metrics: dict[str, float]
    user_metadata: dict[str, Any]
    extra_specs: dict[str, Any]
    callbacks: tuple[Callable[[int, str], None], ...]
    """``on_commit`` callables, run after the commit (errors logged, never raised)."""
    retention: dict[str, Any] | None = None
    """The retention flags recorded in the manifest (``retention.policy_flags``)."""
    ranks_with_shards: list[int] = field(default_factory=list)
    """The ranks that write chunks of sharded tensors (``shard_<r>.safetensors``)."""
    dedup: Any = None
    """A :class:`~ckpt_plugins.dedup.index.DedupPlan` (``dedup=True``, rank 0): the state's
    tensors go to the shared pool, unchanged ones as references."""
    hash_in_stage: bool = False
    """Overlap mode: checksum the tensor files while staging them in the job (:func:`file_heads`)."""
    ready: Any = None
    """Overlap mode with CUDA tensors: the :func:`~.stager.caller_stream_mark` taken at ``save()``,
    which the job's copy waits for."""


class SaveJob:
    """The part of a save that runs on the writer: stage (overlap), write, commit.

    Args:
        request: the save.
        dest: storage, layout, tensor writer and rank.
        stager: whose ``request.slot`` the job holds; it is released last, after ``done`` and the
            ``on_commit`` callbacks, so a ``save()`` waiting for the slot sees this save finished.
        done: ``done(request, manifest)`` once the job has finished: with the committed manifest
            (rank 0), or None (failed, or another rank). Its error fails the save.
    """

    def __init__(
        self,
        request: SaveRequest,
        dest: Destination,
        stager: HostStager,
        *,
        done: Callable[[SaveRequest, Manifest | None], None],
    ) -> None:
        self.request, self.dest, self.stager, self.done = request, dest, stager, done
        self.step, self.name = request.step, request.name
        self._rank_trees: dict[int, Any] = {}
        self._chunks: dict[int, dict[str, list[dict[str, Any]]]] = {}  # rank -> its chunk entries
        self._shared: tuple[dict[str, tuple[str, str]], dict[str, FileRecord]] | None = None
        self._digests: dict[str, Prehashed] = {}  # file group -> checksum taken while staging

    def __call__(self, handle: SaveHandle) -> str:
        try:
            path = self._save(handle)
            for callback in self.request.callbacks if self.dest.rank == 0 else ():
                try:
                    callback(self.step, path)
                except Exception:
                    log.exception("on_commit callback %r failed for step %d", callback, self.step)
            return path
        finally:
            self.stager.release(self.request.slot)

    def _save(self, handle: SaveHandle) -> str:
        req, dest = self.request, self.dest
        temp = dest.layout.new_temp_dir(req.step, req.token, req.name)
        manifest: Manifest | None = None
        try:
            tensors = req.tensors
            if req.staged is not None:
                tensors, self._digests = req.staged.tensors, req.staged.digests
            elif req.stage_in_job:
                heads = file_heads(tensors, req.extra_specs, dedup=req.dedup) if req.hash_in_stage else None
                staged = self.stager.stage(req.slot, tensors, heads, threads=1, after=req.ready)  # one core
                staged.wait()
                tensors, self._digests = staged.tensors, staged.digests
            handle._staged.set_result(None)
            t0 = time.perf_counter()
            dest.storage.makedirs(temp)
            files = self._write_own_files(temp, tensors)
            if dest.rank != 0:
                return handle.path
            files.update(self._write_extra_files(temp, tensors))
            files.update(self._collect_other_ranks(temp))
            parts = {}
            if self._shared is not None:
                parts["state"] = Part(req.flat.tree, None, self._shared[0])
            elif req.flat is not None:
                parts["state"] = Part(req.flat.tree, "state.safetensors" if req.flat.tensors else None)
            for r in req.ranks_with_state:
                file = f"rank_{r}.safetensors"
                parts[f"rank_{r}"] = Part(self._rank_trees[r], file if file in files else None)
            sharded = None
            if req.flat is not None and req.flat.shards:
                sharded = build_index(req.flat.shards, self._chunks.values(), dest.world_size)
            committing = Manifest(
                step=req.step,
                parts=parts,
                files=files,
                metrics=req.metrics,
                world_size=dest.world_size,
                user_metadata=req.user_metadata,
                retention=req.retention,
                sharded=sharded,
                shared_files=self._shared[1] if self._shared is not None else {},
            )
            replace = dest.storage.exists(dest.layout.path_for(req.step, req.name))
            path = dest.layout.commit(temp, committing, replace=replace, name=req.name)
            manifest = committing
            handle.stats["persist_s"] = time.perf_counter() - t0
        except BaseException as exc:
            if dest.rank == 0:
                dest.layout.discard(temp)
            else:
                self._mark_failed(temp)
            if isinstance(exc, OSError) and exc.errno is not None:
                # Name the step and what survived (not the removed temporary folder); OSError(errno,
                # ...) keeps the subclass (ENOSPC, EACCES, ...).
                writing = f" (writing {os.path.basename(exc.filename)})" if isinstance(exc.filename, str) else ""
                raise OSError(
                    exc.errno, f"{exc.strerror or exc}: step {self.step} was not saved{writing}; {self._survivors()}"
                ) from exc
            raise
        finally:
            self.done(req, manifest)
        return path

    def _survivors(self) -> str:
        """What a failed save left as it was, for its error message."""
        layout = self.dest.layout
        try:
            steps = [c.step for c in layout.committed()]
        except Exception:
            return f"the committed checkpoints in {layout.root} are unchanged"
        latest = f"latest: step {steps[-1]}" if steps else "there are none yet"
        return f"the committed checkpoints in {layout.root} are unchanged ({latest})"

    def _write_own_files(self, temp: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, FileRecord]:
        req, dest = self.request, self.dest
        files: dict[str, FileRecord] = {}
        join = dest.storage.join
        state_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
        rank_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("rank/")}
        shard_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("shard/")}
        if req.dedup is not None and req.flat is not None:
            self._shared = req.dedup.write(dest, state_tensors, req.slot)
        elif state_tensors:
            files["state.safetensors"] = dest.write_tensors(
                join(temp, "state.safetensors"), state_tensors, None, req.slot, self._digests.get("state")
            )
        if shard_tensors:
            name = shard_file_name(dest.rank)
            files[name] = dest.write_tensors(
                join(temp, name), shard_tensors, None, req.slot, self._digests.get("shard")
            )
            self._chunks[dest.rank] = chunk_records(req.flat.shards, shard_tensors, name)
        if req.rank_flat is not None:
            name = f"rank_{dest.rank}.safetensors"
            if rank_tensors:
                files[name] = dest.write_tensors(
                    join(temp, name), rank_tensors, None, req.slot, self._digests.get("rank")
                )
            self._rank_trees[dest.rank] = req.rank_flat.tree
        if dest.rank != 0 and (req.rank_flat is not None or shard_tensors):
            part = {
                "tree": None if req.rank_flat is None else req.rank_flat.tree,
                "files": {n: [r.size, r.xxh3_64] for n, r in files.items()},
                "shards": self._chunks.get(dest.rank, {}),
            }
            # Written under another name and renamed: rank 0 polls for the final name and
            # must never read a half-written part (a race the crash soak found).
            final = join(temp, f"rank_{dest.rank}.part.json")
            with dest.storage.open_write(final + ".partial") as out:
                out.write(json.dumps(part, allow_nan=False).encode())
            dest.storage.rename(final + ".partial", final)
        return files

    def _write_extra_files(self, temp: str, staged: Mapping[str, torch.Tensor]) -> dict[str, FileRecord]:
        storage = self.dest.storage
        files = {}
        for name, spec in self.request.extra_specs.items():
            path = storage.join(temp, name)
            if spec[0] == "tensors":
                _, keys, metadata = spec
                tensors = dict(zip(keys, fill_tensors(name, len(keys), staged), strict=True))
                files[name] = self.dest.write_tensors(
                    path, tensors, metadata, self.request.slot, self._digests.get(f"extra/{name}")
                )
                continue
            if spec[0] == "staged":
                _, skeleton, count, write = spec
                files[name] = self._write_staged(
                    path, write, fill(skeleton, fill_tensors(name, count, staged)), self._staged_range(name)
                )
                continue
            with storage.open_write(path) as raw:
                out = HashingWriter(raw)
                if callable(spec[1]):
                    spec[1](out)
                else:
                    out.write(spec[1])
            files[name] = out.record() or checksum_file(storage, path)
        return files

    def _staged_range(self, name: str) -> list[tuple[int, int]]:
        """The staging block of extra file ``name`` (held by this job's slot until it ends), when
        the job writes from it: what its writer may hand to the disk without a copy."""
        if self.request.staged is None and not self.request.stage_in_job:
            return []  # the live tensors (a synchronous save, a memory tier's own copy)
        arena = self.stager.arena(self.request.slot)
        block = arena.memory.get(f"extra/{name}") if arena is not None else None
        if block is None:
            return []
        return [(block.data_ptr(), block.data_ptr() + block.numel())]

    def _write_staged(
        self, path: str, write: Callable[[Any, Any], None], value: Any, stable: list[tuple[int, int]]
    ) -> FileRecord:
        """A staged extra file (``torch.save`` of staged tensors): sequentially with O_DIRECT
        where possible, its writes from the ``stable`` staged memory straight from there; again
        through the page cache if the writer turns out to seek."""
        storage, seeks = self.dest.storage, False
        with storage.open_write(path) as raw, direct_writer(raw, self.dest.direct_io) as direct:
            out = HashingWriter(StableWithin(direct, stable) if direct is not None else raw)
            try:
                write(out, value)
                if direct is not None:
                    direct.finish()
            except io.UnsupportedOperation:
                if direct is None:
                    raise
                seeks = True
        if seeks:
            log.debug("the writer of %s seeks; writing it again through the page cache", path)
            with storage.open_write(path) as raw:
                out = HashingWriter(raw)
                write(out, value)
        return out.record() or checksum_file(storage, path)

    def _collect_other_ranks(self, temp: str) -> dict[str, FileRecord]:
        """Rank 0 waits for each other rank's part file (or its error marker)."""
        storage, timeout = self.dest.storage, self.dest.rank_timeout
        files: dict[str, FileRecord] = {}
        deadline = time.monotonic() + timeout
        for r in sorted(set(self.request.ranks_with_state) | set(self.request.ranks_with_shards)):
            if r == 0:
                continue
            part_path = storage.join(temp, f"rank_{r}.part.json")
            error_path = storage.join(temp, f"rank_{r}.error")
            while not storage.exists(part_path):
                if storage.exists(error_path):
                    with storage.open_read(error_path) as f:
                        raise SaveError(
                            f"rank {r} failed to write its part of step {self.step}: "
                            f"{f.read().decode(errors='replace')}"
                        )
                if time.monotonic() > deadline:
                    raise SaveError(
                        f"rank {r} did not write its part of step {self.step} within "
                        f"{timeout:.0f} s (rank_timeout); is it still alive?"
                    )
                time.sleep(0.01)
            with storage.open_read(part_path) as f:
                part = json.loads(f.read())
            if r in self.request.ranks_with_state:
                self._rank_trees[r] = part["tree"]
            if part.get("shards"):
                self._chunks[r] = part["shards"]
            for name, (size, digest) in part["files"].items():
                files[name] = FileRecord(size=size, xxh3_64=digest)
            storage.remove_file(part_path)
        return files

    def _mark_failed(self, temp: str) -> None:
        storage = self.dest.storage
        try:
            storage.makedirs(temp)
            with storage.open_write(storage.join(temp, f"rank_{self.dest.rank}.error")) as out:
                out.write(b"see that rank's log")
        except OSError:
            pass
