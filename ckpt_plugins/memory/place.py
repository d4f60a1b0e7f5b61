"""Where a directory's snapshots live in shared memory, and whether they fit.

``/dev/shm/ckpt_plugins-<uid>-<hash>/rank<r>/`` with ``hash`` taken from the checkpoint directory
(its real path, or the URL as given): a new process on the same directory, after a crash, finds the
snapshots of the one before; two directories never share a folder. ``rank<r>/peer/`` holds the ring
peer's copy (docs/memory_tier.md).
"""

from __future__ import annotations

import hashlib
import os

from ckpt_plugins.errors import ConfigError

__all__ = ["check_budget", "check_root", "folder_bytes", "snapshot_root"]

MiB = 1 << 20


def snapshot_root(shm: str, directory: str) -> str:
    """The folder of ``directory``'s snapshots under the shared-memory file system ``shm``."""
    key = directory if "://" in directory else os.path.realpath(os.path.abspath(directory))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(shm, f"ckpt_plugins-{os.getuid()}-{digest}")


def check_root(shm: str, budget_bytes: int | None) -> None:
    """At construction: ``shm`` is a writable folder, and a budget is not larger than it can hold."""
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK | os.X_OK):
        raise ConfigError(
            f"memory_tier: $root={shm!r} is not a writable folder; the in-memory tier needs a shared-memory "
            "file system (a tmpfs such as /dev/shm): mount one or pass MemoryTierOptions(root=...)",
            option="root",
            value=shm,
        )
    st = os.statvfs(shm)
    total = st.f_blocks * st.f_frsize
    if budget_bytes is not None and budget_bytes > total:
        raise ConfigError(
            f"memory_tier: $budget_bytes={budget_bytes} ({budget_bytes / MiB:.0f} MiB) is more than {shm} holds "
            f"({total / MiB:.0f} MiB in all); lower budget_bytes, or enlarge {shm} "
            "(mount -o remount,size=... or docker --shm-size)",
            option="budget_bytes",
            value=budget_bytes,
        )


def check_budget(
    shm: str, state_bytes: int, *, keep: int, copies: int, budget_bytes: int | None, held_bytes: int
) -> None:
    """Before a snapshot of ``state_bytes``: ``keep + 1`` snapshots (a new one is written before the
    oldest goes) times ``copies`` (2 with a peer's copy) fit the budget and the free space
    (``held_bytes``: what this tier already holds there, which is reused)."""
    need = state_bytes * (keep + 1) * copies
    what = (
        f"a snapshot of this state is {state_bytes / MiB:.1f} MiB; keep={keep} (+1 being written)"
        f"{' with a peer copy each' if copies > 1 else ''} needs {need / MiB:.1f} MiB"
    )
    if budget_bytes is not None and need > budget_bytes:
        raise ConfigError(
            f"memory_tier: {what}, more than $budget_bytes={budget_bytes} ({budget_bytes / MiB:.1f} MiB); "
            "raise budget_bytes, lower keep, or pass peers=False",
            option="budget_bytes",
            value=budget_bytes,
            mentions=("keep",),
        )
    st = os.statvfs(shm)
    free = st.f_bavail * st.f_frsize + held_bytes
    if need > free:
        raise ConfigError(
            f"memory_tier: {what}, but {shm} has {free / MiB:.1f} MiB free; lower $keep, pass peers=False, "
            f"or enlarge {shm} (mount -o remount,size=... or docker --shm-size)",
            option="keep",
            value=keep,
        )


def folder_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for base, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total
