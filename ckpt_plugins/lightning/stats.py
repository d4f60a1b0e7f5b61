"""Per-save figures: how long training was blocked, how many bytes, how long until durable.

``stall_s`` is measured on the training thread around the whole save (building Lightning's dict,
copying tensors into staging buffers). ``persist_s`` is the time from the save returning to its
commit, i.e. the background part; for a synchronous save it is the write inside the call. Commits
are reported by the writer thread and handed to the training thread, which alone talks to the
trainer's loggers (they are not thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["SaveStats"]

log = logging.getLogger(__name__)


class SaveStats:
    """Figures of every save of one callback (``records``), and their delivery to loggers."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self._returned: dict[int, float] = {}
        self._committed: list[tuple[int, float]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks to start the ranks
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def saved(self, step: int, stall_s: float, nbytes: float, persist_s: float | None) -> dict[str, float]:
        """A save returned to the training loop (``persist_s`` known when it was synchronous)."""
        record = {"step": float(step), "stall_s": stall_s, "bytes": nbytes}
        if persist_s is not None:
            record["persist_s"] = persist_s
        with self._lock:
            self.records.append(record)
            if persist_s is None:
                self._returned[step] = time.perf_counter()
        log.info("checkpoint step %d: training blocked %.1f ms for %.1f MiB%s", step, stall_s * 1e3,
                 nbytes / 2**20, "" if persist_s is None else f", written in {persist_s:.2f} s")
        return record

    def on_commit(self, step: int, path: str) -> None:
        """Writer thread: the save of ``step`` committed."""
        with self._lock:
            self._committed.append((step, time.perf_counter()))

    def drain(self) -> list[dict[str, float]]:
        """Training thread: records whose background save committed since the last call."""
        with self._lock:
            committed, self._committed = self._committed, []
            done = []
            for step, when in committed:
                returned = self._returned.pop(step, None)
                record = next((r for r in reversed(self.records) if r["step"] == step), None)
                if returned is not None and record is not None:
                    record["persist_s"] = when - returned
                    done.append(record)
        for record in done:
            log.info("checkpoint step %d committed %.2f s after the save returned", record["step"], record["persist_s"])
        return done

    @staticmethod
    def log_to(trainer: Any, record: dict[str, float], keys: tuple[str, ...]) -> None:
        """Send ``keys`` of ``record`` to the trainer's loggers as ``checkpoint/<key>`` (rank 0)."""
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {f"checkpoint/{k}": record[k] for k in keys if k in record}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(record["step"]))
