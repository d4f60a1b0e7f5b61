"""Save on preemption: a signal sets a flag, the training loop saves at an agreed step and stops.

Schedulers warn before they kill (SLURM: SIGUSR1 or SIGTERM; Kubernetes and spot instances:
SIGTERM, then SIGKILL after a grace period). While a :class:`PreemptionWatch` is started (an
adapter's training loop, or a plain loop that polls ``CheckpointManager.preemption_requested()``)
the signals in ``preemption_signals`` get :func:`_on_signal`, which only records the signal: no
lock, no I/O, no collective (it runs on the main thread between two bytecodes, possibly inside
``save()``). The loop asks :meth:`PreemptionWatch.requested` at every step boundary:

* one process: the flag is read; nothing else happens;
* under ``torch.distributed``: every ``preemption_sync_every`` steps the ranks exchange their
  flags with one ``all_reduce(MAX)`` of a one-element tensor, so all of them stop at the same
  step even when only one got the signal. Between two exchanges nothing is sent. A collective
  "only while a signal is pending" cannot be made safe: a rank that has not seen the signal
  would not join it and the ranks' collectives would pair up wrongly; a rank cannot learn of a
  signal without a message. Launchers that deliver the signal to every rank (SLURM, torchrun,
  Lightning's subprocess launcher through :func:`add_forwarder`) make the flags agree anyway;
  the exchange confirms the step.

When ``requested()`` says yes the caller saves at that step, waits until it is durable and stops.
At interpreter exit (after pending saves are flushed) the process ends with the signal's default
action, as it would have without this module, only later: the scheduler sees "terminated by
SIGTERM" (exit status 143), which Kubernetes Jobs and torchelastic count as a failure to retry,
not as a finished run. With no watch started, the signals keep what :mod:`.exit_hooks` installs
(SIGTERM: flush pending saves, then terminate).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ckpt_plugins.options.groups import PreemptionOptions

__all__ = ["PreemptionWatch", "add_forwarder", "pending_signal"]

log = logging.getLogger(__name__)

# process-wide: the signal received while a watch was started (0: none), who watches, what the
# signals' handlers were before, and the callables a signal is also passed to
_pending = 0
_watches: list[PreemptionWatch] = []
_previous: dict[int, Any] = {}
_forwarders: list[Callable[[int], None]] = []
_chained: set[int] = set()
_exit_armed = False


def pending_signal() -> int:
    """The preemption signal received while a watch was started (0: none), on this process."""
    return _pending


def add_forwarder(fn: Callable[[int], None]) -> Callable[[], None]:
    """Also pass each preemption signal to ``fn(signum)`` (from the handler: it must not block);
    Lightning's subprocess launcher forwards it to the other ranks. Returns the undo."""
    _forwarders.append(fn)
    return lambda: _forwarders.remove(fn) if fn in _forwarders else None


def _on_signal(signum: int, frame: Any) -> None:
    """Record the signal; pass it on to the forwarders and, where asked, the previous handler."""
    global _pending
    first = _pending == 0
    if first:
        _pending = signum
        for forward in list(_forwarders):
            try:
                forward(signum)
            except Exception:  # a child that is gone already
                pass
    if signum in _chained:
        previous = _previous.get(signum)
        if callable(previous):
            previous(signum, frame)


class PreemptionWatch:
    """One training loop's view of preemption signals (see the module docstring).

    Args:
        options: the manager's :class:`~ckpt_plugins.options.PreemptionOptions`.
        distributed: exchange flags under ``torch.distributed`` (False: a world of one).
    """

    def __init__(self, options: PreemptionOptions, *, distributed: bool = True) -> None:
        self.options = options
        self.distributed = distributed
        self.started = False
        self.stopping_at: int | None = None
        """The step at which :meth:`requested` said yes (None before)."""
        self._calls = 0

    @property
    def enabled(self) -> bool:
        return self.options.save_on_preemption

    def start(self, chain: Iterable[int] = ()) -> None:
        """Install the handlers (main thread only; elsewhere the signals keep theirs).

        ``chain``: signal numbers whose previous handler is still called after ours (Lightning's
        SLURM requeue handler on its requeue signal)."""
        if not self.enabled or self.started:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("save_on_preemption: not on the main thread, the signal handlers cannot be installed")
            return
        self.started = True
        if not _watches:
            for signum in self.options.signal_numbers:
                _previous[signum] = signal.getsignal(signum)
                signal.signal(signum, _on_signal)
        _watches.append(self)
        _chained.update(chain)

    def stop(self) -> None:
        """Give the signals back their previous handlers when the last watch stops (a handler
        that is no longer ours, installed by someone since, is left alone)."""
        if not self.started:
            return
        self.started = False
        if _pending and self.stopping_at is None:
            _arm_exit(_pending)  # arrived after the last step boundary: still end as the signal says
        if self in _watches:
            _watches.remove(self)
        if _watches or threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in list(_previous.items()):
            if signal.getsignal(signum) is _on_signal and previous is not None:
                signal.signal(signum, previous)
            del _previous[signum]
        _chained.clear()

    def requested(self, step: int | None = None) -> bool:
        """At a step boundary, on every rank: stop and save here? (a collective every
        ``preemption_sync_every`` calls under ``torch.distributed``; see the module docstring)."""
        if not self.enabled:
            return False
        if not self.started:
            self.start()
        if self.stopping_at is not None:
            return True
        self._calls += 1
        from ckpt_plugins.distributed import is_distributed

        if self.distributed and is_distributed():
            if self._calls % self.options.preemption_sync_every:
                return False
            flag = _exchange(_pending)
        else:
            flag = _pending
        if not flag:
            return False
        self.stopping_at = self._calls if step is None else step
        log.warning(
            "preemption: %s received; saving at step %s, then stopping",
            signal.Signals(flag).name,
            "?" if step is None else step,
        )
        _arm_exit(flag)
        return True


def _exchange(flag: int) -> int:
    """The largest flag of any rank (one all_reduce of one int64, on the training thread)."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    box = torch.tensor([flag], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def _arm_exit(signum: int) -> None:
    """At interpreter exit, after pending saves are flushed, end with ``signum``'s default action."""
    global _exit_armed
    if _exit_armed:
        return
    _exit_armed = True
    atexit.register(_exit_with_signal, signum)


def _exit_with_signal(signum: int) -> None:
    from ckpt_plugins.persist import exit_hooks

    exit_hooks.flush_all()
    if os.environ.get("CKPT_PLUGINS_PREEMPTION_EXIT", "signal") != "signal":
        return  # documented escape hatch: exit normally (status 0) after the clean stop
    log.info("preemption: ending the process with %s, as the scheduler expects", signal.Signals(signum).name)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
