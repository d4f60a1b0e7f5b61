"""Flush pending saves when the process ends: at interpreter exit and on SIGTERM.

A background save that is still writing when the process exits would be lost (daemon threads
are killed at exit). Open managers are tracked weakly; at exit each is closed, which waits for its
saves. SIGTERM (what schedulers and ``kill`` send before SIGKILL) gets a handler that flushes,
then hands over to the handler that was there before (the default one ends the process).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from typing import Any

__all__ = ["flush_all", "register", "unregister"]

log = logging.getLogger(__name__)

_managers: weakref.WeakSet[Any] = weakref.WeakSet()
_installed = False
_previous_sigterm: Any = None
_terminating: str = ""  # "", "flushing", "flushed"


def register(manager: Any) -> None:
    """Track ``manager`` so that exit and SIGTERM wait for its pending saves."""
    global _installed
    _managers.add(manager)
    if not _installed:
        _installed = True
        atexit.register(flush_all)
        _install_sigterm()


def unregister(manager: Any) -> None:
    _managers.discard(manager)


def flush_all() -> None:
    """Close every open manager (waiting for its saves); errors are logged, not raised."""
    for manager in list(_managers):
        try:
            manager.close()
        except Exception as exc:
            log.error("while flushing %r at exit: %s", manager, exc)


def _install_sigterm() -> None:
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return
    _previous_sigterm = previous
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Flush pending saves, then let SIGTERM do what it would have done.

    The handler runs on the main thread between two bytecodes, possibly while that thread holds
    a lock (the engine's, inside ``save()``), so it must not take one or wait here: finding the
    pending saves and waiting for them run on a helper thread and the handler returns at once.
    When a previous handler exists (Lightning installs one to stop training gracefully) it is
    called, and the manager's close() at the end of training flushes. Otherwise the helper thread
    flushes, then sends SIGTERM again, which this handler passes to the default action.
    """
    global _terminating
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    if _terminating == "flushed":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _terminating:
        return  # a flush is already under way
    _terminating = "flushing"
    threading.Thread(target=_flush_then_terminate, args=(list(_managers),), name="ckpt-sigterm", daemon=True).start()


def _flush_then_terminate(managers: list[Any]) -> None:
    global _terminating
    pending = [m for m in managers if m._persister.engine.pending()]  # waits for save() to let go of the lock
    if pending:
        log.warning("SIGTERM: waiting for %d manager(s) to commit pending saves", len(pending))
    for manager in pending:
        manager._persister.engine.flush()
    _terminating = "flushed"
    os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread: default action now
