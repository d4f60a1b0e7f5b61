"""Ring peers: each rank keeps a copy of rank ``r-1``'s newest snapshot, sent in the background.

The transfer uses its own gloo process group (made once, at construction, by every rank), so it
never interleaves with the training's collectives, and point-to-point messages with their own tags:
``BACKGROUND`` for the copies sent after every snapshot, ``REPAIR`` for a copy sent back at restore
to a rank that lost its memory. A message is two tensors: ``[header bytes, data bytes]`` (int64),
then the bytes: a JSON header (step, file names and sizes) and the files' contents, the manifest
last. The receiver writes them into a hidden folder and commits it by rename, like any snapshot,
so a transfer cut short (the sender killed) leaves nothing that is listed. No pickle anywhere.

Only the newest pending snapshot is sent: when saves come faster than the link, older ones are
dropped. ``close()`` sends what is pending, then a sentinel (``[-1, 0]``) that ends the peer's
receiver; every rank closes at the end of a normal run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from datetime import timedelta
from typing import Any

import torch

from ckpt_plugins.files.manifest import MANIFEST_NAME
from ckpt_plugins.layout.commit import TMP_PREFIX, Layout

__all__ = ["BACKGROUND", "REPAIR", "RingPeers"]

log = logging.getLogger(__name__)

BACKGROUND = 11
REPAIR = 12


def pack(path: str, step: int) -> tuple[torch.Tensor, int]:
    """A snapshot folder as one uint8 tensor (JSON header, then the files, manifest last) and the
    header's length."""
    names = [*sorted(n for n in os.listdir(path) if n != MANIFEST_NAME), MANIFEST_NAME]
    blobs = []
    for name in names:
        with open(os.path.join(path, name), "rb") as f:
            blobs.append(f.read())
    header = json.dumps({"step": step, "files": [[n, len(b)] for n, b in zip(names, blobs, strict=True)]}).encode()
    out = torch.empty(len(header) + sum(len(b) for b in blobs), dtype=torch.uint8)
    view = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
    offset = 0
    for blob in (header, *blobs):
        view[offset : offset + len(blob)] = blob
        offset += len(blob)
    return out, len(header)


def unpack_into(layout: Layout, data: torch.Tensor, header_len: int, keep: int) -> int:
    """Commit a packed snapshot into ``layout`` (replacing that step and any later one); keep the
    newest ``keep``; return its step."""
    raw = memoryview(data.numpy()).cast("B")  # type: ignore[arg-type]
    header = json.loads(bytes(raw[:header_len]))
    step = int(header["step"])
    final = layout.path_for(step)
    temp = os.path.join(layout.root, f"{TMP_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:12]}")
    os.makedirs(temp)
    offset = header_len
    try:
        for name, size in header["files"]:
            if "/" in name or name.startswith("."):
                raise ValueError(f"peer snapshot file name {name!r} is not a plain name")
            with open(os.path.join(temp, name), "wb") as f:
                f.write(raw[offset : offset + size])
            offset += size
        for ckpt in layout.committed():
            if ckpt.step >= step:
                layout.delete(ckpt.step)
        os.rename(temp, final)
    except BaseException:
        layout.discard(temp)
        raise
    for old in [c.step for c in layout.committed()][:-keep]:
        layout.delete(old)
    return step


class RingPeers:
    """The background sender (to ``rank+1``) and receiver (from ``rank-1``) of one rank.

    Args:
        tier: the rank's :class:`~ckpt_plugins.memory.tier.MemoryTier` (its peer layout and lock).
        group: a gloo process group of every rank (``dist.new_group(backend="gloo")``).
    """

    def __init__(self, tier: Any, group: Any) -> None:
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.tier = tier
        self.rank, self.world = tier.rank, tier.world_size
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        self._pending: tuple[int, str] | None = None
        self._cond = threading.Condition()
        self._closing = False
        self.sent: list[int] = []  # steps sent, for tests and logs
        self.received: list[int] = []
        self._sender = threading.Thread(target=self._send_loop, name="ckpt-peer-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="ckpt-peer-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    # --- background copies ---------------------------------------------------------------------
    def offer(self, step: int, path: str) -> None:
        """Send this snapshot to the peer when the link is free (replacing one not yet sent)."""
        with self._cond:
            self._pending = (step, path)
            self._cond.notify()

    def _send_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._pending is None and not self._closing:
                        self._cond.wait()
                    item, self._pending = self._pending, None
                    if item is None:  # closing, nothing pending
                        break
                step, path = item
                with self.tier.lock:  # not pruned while read
                    try:
                        data, header_len = pack(path, step)
                    except FileNotFoundError:
                        continue  # superseded meanwhile; the newer one is pending
                self._send(data, header_len, BACKGROUND)
                self.sent.append(step)
            self._send(None, -1, BACKGROUND)
        except Exception as exc:  # the peer is gone (killed); training goes on without the copy
            log.warning("memory tier: sending snapshots to rank %d stopped: %s", self.next, exc)

    def _receive_loop(self) -> None:
        try:
            while True:
                got = self._recv(self.prev, BACKGROUND)
                if got is None:
                    break
                data, header_len = got
                step = unpack_into(self.tier.peer_layout, data, header_len, self.tier.options.keep)
                self.received.append(step)
                log.debug("memory tier: holding rank %d's snapshot of step %d", self.prev, step)
        except Exception as exc:
            log.warning("memory tier: receiving rank %d's snapshots stopped: %s", self.prev, exc)

    def _send(self, data: torch.Tensor | None, header_len: int, tag: int, dst: int | None = None) -> None:
        dst = self.next if dst is None else dst
        sizes = torch.tensor([header_len, 0 if data is None else data.numel() - header_len], dtype=torch.int64)
        self.dist.send(sizes, dst, group=self.group, tag=tag)
        if data is not None:
            self.dist.send(data, dst, group=self.group, tag=tag)

    def _recv(self, src: int, tag: int) -> tuple[torch.Tensor, int] | None:
        sizes = torch.empty(2, dtype=torch.int64)
        self.dist.recv(sizes, src, group=self.group, tag=tag)
        header_len, data_len = int(sizes[0]), int(sizes[1])
        if header_len < 0:
            return None
        data = torch.empty(header_len + data_len, dtype=torch.uint8)
        self.dist.recv(data, src, group=self.group, tag=tag)
        return data, header_len

    # --- repair at restore (training thread, every rank in the same order) ----------------------
    def send_back(self, step: int, to: int) -> None:
        """Send the copy of ``to``'s snapshot of ``step`` this rank holds back to ``to``."""
        path = self.tier.peer_layout.path_for(step)
        data, header_len = pack(path, step)
        self._send(data, header_len, REPAIR, dst=to)
        log.warning("memory tier: sent rank %d its lost snapshot of step %d from this rank's copy", to, step)

    def receive_back(self, src: int) -> int:
        """Receive this rank's own snapshot from the peer holding its copy; commit it; its step."""
        got = self._recv(src, REPAIR)
        assert got is not None
        data, header_len = got
        step = unpack_into(self.tier.layout, data, header_len, self.tier.options.keep)
        log.warning("memory tier: recovered this rank's snapshot of step %d from rank %d", step, src)
        return step

    def close(self, timeout: float = 60.0) -> None:
        """Send what is pending and the end-of-stream sentinel; wait for the peer's sentinel; then a
        barrier of the peers' group, so that no rank goes on to tear down its process groups (and
        close its sockets, with the peer's last receive notifications unread: a reset the peer sees
        as "connection closed by peer") while another rank's transfer is still being read."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._sender.join(timeout)
        self._receiver.join(timeout)
        if self._sender.is_alive() or self._receiver.is_alive():
            log.warning("memory tier: the snapshot transfer with the ring peers did not end within %.0f s", timeout)
            return
        try:
            self.dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=timeout))
        except Exception as exc:  # a peer is gone (killed): nothing left to wait for
            log.warning("memory tier: the ring peers' closing barrier failed: %s", exc)
