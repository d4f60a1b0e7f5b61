"""Start a child that prints ``READY <step>`` once it reaches a step, send it a signal then, and
collect what it printed: the preemption tests of both adapters wait on that event, never on time."""

from __future__ import annotations

import os
import signal
import subprocess


def signal_when_ready(
    command: list[str],
    at: int,
    env: dict[str, str],
    *,
    signum: int = signal.SIGTERM,
    timeout: float = 150,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[int, list[str], str]:
    """Run ``command``, send ``signum`` after its ``READY <at>`` line, and return its exit code, its
    stdout lines and its stderr. ``timeout`` is a generous bound on the grace period; a child still
    running after it (or when the test fails) is killed with its process group."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"READY {at}"):
                break
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, lines + out.splitlines(keepends=True), err
