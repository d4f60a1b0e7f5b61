"""Per-save figures: how long training was blocked, how many bytes, how long until durable.

All three come from the core's ``handle.stats`` (nothing is timed here): ``stall_ms`` is the
save's ``stall_s`` (the part of ``save`` that blocks training), ``bytes`` what was staged, and
``durable_s`` its ``persist_s`` (writing and committing, the background part), complete when the
handle's done callback runs. Commits are reported by the writer thread and handed to the
training thread, which alone talks to the trainer's loggers (they are not thread-safe).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ckpt_plugins.persist.engine import SaveHandle

__all__ = ["SaveStats"]

log = logging.getLogger(__name__)


class SaveStats:
    """Figures of every save of one callback (``records``), and their delivery to loggers."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self._committed: list[dict[str, float]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks to start the ranks
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def saved(self, handle: SaveHandle) -> dict[str, float]:
        """A save returned to the training loop; its commit is picked up by :meth:`drain`."""
        record = {
            "step": float(handle.step),
            "stall_ms": float(handle.stats.get("stall_s", 0.0)) * 1e3,
            "bytes": float(handle.stats.get("bytes", 0.0)),
        }
        with self._lock:
            self.records.append(record)
        log.info(
            "checkpoint step %d: training blocked %.1f ms for %.1f MiB",
            handle.step,
            record["stall_ms"],
            record["bytes"] / 2**20,
        )
        handle.add_done_callback(lambda h: self._done(h, record))  # at once if already committed
        return record

    def _done(self, handle: SaveHandle, record: dict[str, float]) -> None:
        """Writer thread (or the caller, for a synchronous save): the save committed or failed."""
        if "persist_s" not in handle.stats:
            return  # failed before its commit: the error surfaces through the manager
        with self._lock:
            record["durable_s"] = handle.stats["persist_s"]
            self._committed.append(record)

    def drain(self) -> list[dict[str, float]]:
        """Training thread: records whose save committed since the last call."""
        with self._lock:
            done, self._committed = self._committed, []
        for record in done:
            log.info("checkpoint step %d committed, written in %.2f s", record["step"], record["durable_s"])
        return done

    @staticmethod
    def log_to(trainer: Any, record: dict[str, float], keys: tuple[str, ...]) -> None:
        """Send ``keys`` of ``record`` to the trainer's loggers as ``checkpoint/<key>`` (rank 0)."""
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {f"checkpoint/{k}": record[k] for k in keys if k in record}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(record["step"]))
