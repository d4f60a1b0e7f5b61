"""The part of a save that runs on the background writer: stage, write, commit, retain.

One job per save, run in order by the persist engine. Rank 0 writes the replicated state and the
extra files, waits for every other rank's part (a ``rank_N.part.json`` each rank writes into the
shared temporary folder once its files are complete, or a ``rank_N.error`` marker), writes the
manifest and commits; then it removes checkpoints after the step on overwrite and applies the
retention policy. Other ranks only write their part. A failure removes the temporary folder, so a
failed save leaves nothing behind and deletes nothing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ckpt_plugins.storage.direct_io import direct_writer
from ckpt_plugins.persist.engine import SaveHandle
from ckpt_plugins.errors import SaveError
from ckpt_plugins.files.extra_files import fill, fill_tensors
from ckpt_plugins.files.manifest import Manifest, Part
from ckpt_plugins.retention.policy import CheckpointRecord, policy_flags
from ckpt_plugins.files.tensor_file import FileRecord, HashingWriter, checksum_file

if TYPE_CHECKING:
    from ckpt_plugins.manager import CheckpointManager

__all__ = ["SaveJob"]

log = logging.getLogger(__name__)


class SaveJob:
    """The part of a save that runs on the writer: stage (overlap), write, commit, retain."""

    def __init__(self, mgr: "CheckpointManager", step: int, token: str, ranks_with_state: list[int],
                 flat, rank_flat, tensors,
                 staged, slot: int, metrics: dict[str, float], user_metadata: dict,
                 on_commit: Callable[[int, str], None] | None, extra_specs: dict,
                 name: str | None = None) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def __call__(self, handle: SaveHandle) -> str:
        mgr = self.mgr
        temp = mgr.layout.new_temp_dir(self.step, self.token, self.name)
        try:
            tensors = self.tensors
            if self.staged is not None:
                tensors = self.staged.tensors
            elif mgr.options.saving.snapshot == "overlap":
                staged = mgr._stager.stage(self.slot, tensors)
                staged.wait()
                tensors = staged.tensors
            handle._staged.set_result(None)
            t0 = time.perf_counter()
            mgr.storage.makedirs(temp)
            files = self._write_own_files(temp, tensors)
            if mgr.rank != 0:
                return handle.path
            files.update(self._write_extra_files(temp, tensors))
            files.update(self._collect_other_ranks(temp))
            parts = {}
            if self.flat is not None:
                parts["state"] = Part(self.flat.tree, "state.safetensors" if self.flat.tensors else None)
            for r in self.ranks_with_state:
                parts[f"rank_{r}"] = Part(self._rank_trees[r], f"rank_{r}.safetensors" if f"rank_{r}.safetensors" in files else None)
            manifest = Manifest(step=self.step, parts=parts, files=files, metrics=self.metrics,
                                world_size=mgr.world_size, user_metadata=self.user_metadata,
                                retention=policy_flags(mgr.policy))
            replace = mgr.storage.exists(mgr.layout.path_for(self.step, self.name))
            path = mgr.layout.commit(temp, manifest, replace=replace, name=self.name)
            handle.stats["persist_s"] = time.perf_counter() - t0
            if self.name is None:
                self._after_commit(manifest)
        except BaseException as exc:
            if mgr.rank == 0:
                mgr.layout.discard(temp)
            else:
                self._mark_failed(temp)
            if isinstance(exc, OSError) and exc.errno is not None:
                # Name the step and what survived (not the removed temporary folder); OSError(errno,
                # ...) keeps the subclass (ENOSPC, EACCES, ...).
                writing = f" (writing {os.path.basename(exc.filename)})" if isinstance(exc.filename, str) else ""
                raise OSError(exc.errno, f"{exc.strerror or exc}: step {self.step} was not saved{writing}; "
                              f"{self._survivors()}") from exc
            raise
        finally:
            mgr._stager.release(self.slot)
            with mgr._state_lock:
                mgr._in_flight.discard(self.step)
        for callback in [*mgr.options.saving.callbacks, *([self.on_commit] if self.on_commit else [])]:
            try:
                callback(self.step, path)
            except Exception:  # noqa: BLE001 - a callback must not turn a committed save into a failure
                log.exception("on_commit callback %r failed for step %d", callback, self.step)
        return path

    def _survivors(self) -> str:
        """What a failed save left as it was, for its error message."""
        mgr = self.mgr
        try:
            steps = mgr.steps()
        except Exception:  # noqa: BLE001 - the message must not hide the original error
            return f"the committed checkpoints in {mgr.directory} are unchanged"
        latest = f"latest: step {steps[-1]}" if steps else "there are none yet"
        return f"the committed checkpoints in {mgr.directory} are unchanged ({latest})"

    def _write_own_files(self, temp: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, FileRecord]:
        mgr = self.mgr
        files: dict[str, FileRecord] = {}
        join = mgr.storage.join
        state_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
        rank_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("rank/")}
        if state_tensors:
            files["state.safetensors"] = mgr._write_tensors(join(temp, "state.safetensors"), state_tensors, slot=self.slot)
        self._rank_trees: dict[int, Any] = {}
        if self.rank_flat is not None:
            name = f"rank_{mgr.rank}.safetensors"
            if rank_tensors:
                files[name] = mgr._write_tensors(join(temp, name), rank_tensors, slot=self.slot)
            self._rank_trees[mgr.rank] = self.rank_flat.tree
            if mgr.rank != 0:
                part = {"tree": self.rank_flat.tree,
                        "files": {n: [r.size, r.xxh3_64] for n, r in files.items()}}
                # Written under another name and renamed: rank 0 polls for the final name and
                # must never read a half-written part (a race the crash soak found).
                final = join(temp, f"rank_{mgr.rank}.part.json")
                with mgr.storage.open_write(final + ".partial") as out:
                    out.write(json.dumps(part, allow_nan=False).encode())
                mgr.storage.rename(final + ".partial", final)
        return files

    def _write_extra_files(self, temp: str, staged: Mapping[str, torch.Tensor]) -> dict[str, FileRecord]:
        mgr = self.mgr
        files = {}
        for name, spec in self.extra_specs.items():
            path = mgr.storage.join(temp, name)
            if spec[0] == "tensors":
                _, keys, metadata = spec
                tensors = dict(zip(keys, fill_tensors(name, len(keys), staged)))
                files[name] = mgr._write_tensors(path, tensors, metadata, slot=self.slot)
                continue
            if spec[0] == "staged":
                _, skeleton, count, write = spec
                files[name] = self._write_staged(path, write, fill(skeleton, fill_tensors(name, count, staged)))
                continue
            with mgr.storage.open_write(path) as raw:
                out = HashingWriter(raw)
                if callable(spec[1]):
                    spec[1](out)
                else:
                    out.write(spec[1])
            files[name] = out.record() or checksum_file(mgr.storage, path)
        return files

    def _write_staged(self, path: str, write: Callable[[Any, Any], None], value: Any) -> FileRecord:
        """A staged extra file (``torch.save`` of staged tensors): sequentially with O_DIRECT
        where possible; again through the page cache if the writer turns out to seek."""
        storage, seeks = self.mgr.storage, False
        with storage.open_write(path) as raw, direct_writer(raw, self.mgr.direct_io) as direct:
            out = HashingWriter(direct or raw)
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
        mgr = self.mgr
        files: dict[str, FileRecord] = {}
        deadline = time.monotonic() + mgr.options.distributed.rank_timeout
        for r in self.ranks_with_state:
            if r == 0:
                continue
            part_path = mgr.storage.join(temp, f"rank_{r}.part.json")
            error_path = mgr.storage.join(temp, f"rank_{r}.error")
            while not mgr.storage.exists(part_path):
                if mgr.storage.exists(error_path):
                    with mgr.storage.open_read(error_path) as f:
                        raise SaveError(f"rank {r} failed to write its part of step {self.step}: "
                                        f"{f.read().decode(errors='replace')}")
                if time.monotonic() > deadline:
                    raise SaveError(f"rank {r} did not write its part of step {self.step} within "
                                    f"{mgr.options.distributed.rank_timeout:.0f} s (rank_timeout); is it still alive?")
                time.sleep(0.01)
            with mgr.storage.open_read(part_path) as f:
                part = json.loads(f.read())
            self._rank_trees[r] = part["tree"]
            for name, (size, digest) in part["files"].items():
                files[name] = FileRecord(size=size, xxh3_64=digest)
            mgr.storage.remove_file(part_path)
        return files

    def _mark_failed(self, temp: str) -> None:
        try:
            mgr = self.mgr
            mgr.storage.makedirs(temp)
            with mgr.storage.open_write(mgr.storage.join(temp, f"rank_{mgr.rank}.error")) as out:
                out.write(b"see that rank's log")
        except OSError:
            pass

    def _after_commit(self, manifest: Manifest) -> None:
        """Drop later checkpoints (overwrite, or an earlier run's after a resume: ``start_run``), then
        apply retention. Rank 0, after the commit."""
        mgr = self.mgr
        with mgr._state_lock:
            replaceable, mgr._replaceable = mgr._replaceable, frozenset()
        for later in [s for s in mgr.steps() if s > self.step or (s in replaceable and s != self.step)]:
            log.info("removing step %d: a checkpoint of an earlier run, superseded by this run's step %d", later,
                     self.step)
            mgr.layout.delete(later)
        with mgr._state_lock:
            mgr._records[self.step] = CheckpointRecord(self.step, manifest.wall_time, manifest.metrics)
            if mgr._restored_step is not None and self.step > mgr._restored_step:
                mgr._restored_step = None  # a newer checkpoint exists now: no longer protected
        mgr.prune()
