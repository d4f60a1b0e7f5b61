"""Helpers shared by the benchmarks: timing, disk bandwidth, memory sampling, machine facts, output.

Every benchmark in this folder is a script with a ``main(argv=None)`` that writes its own
``results/<name>.md`` (and usually ``.json`` / ``.png``); ``run_all.py`` runs them in sequence.
Nothing here imports ckpt_plugins, so a helper never measures the code under test by accident.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "MB",
    "REPO",
    "RESULTS",
    "TMP",
    "OtherLoad",
    "PeakRss",
    "RssSampler",
    "Stopwatch",
    "aligned_random_bytes",
    "cpu_seconds",
    "disk_write_bandwidth",
    "drop_page_cache",
    "evict_files",
    "file_bytes",
    "fmt_ratio",
    "fmt_s",
    "machine_info",
    "md_table",
    "median",
    "peak_rss_bytes",
    "peak_rss_reset",
    "pss_bytes",
    "publish_e2e",
    "resident_bytes",
    "rss_bytes",
    "scratch_dir",
    "spread",
    "sync_disk",
    "verdict",
    "write_json",
    "write_text",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TMP = RESULTS / "tmp"  # gitignored, on the same disk as the repo (never $TMPDIR: may be tmpfs)
MB = 1e6


# --- statistics and timing --------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process groups the sharded benchmarks start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of the values, for 'median (min-max)' cells."""
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.s`` (seconds, perf_counter)."""

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        self.s = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


# --- disk --------------------------------------------------------------------------------------
@contextlib.contextmanager
def scratch_dir(name: str):
    """A fresh folder under ``benchmarks/results/tmp`` (same disk as the repo), removed afterwards."""
    path = TMP / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            TMP.rmdir()  # only when empty: another benchmark may be using it


def sync_disk() -> None:
    """Write back every dirty page (other runs' too), so one measurement does not pay for another."""
    os.sync()


def drop_page_cache() -> bool:
    """Drop the page cache (needs root and a writable /proc/sys/vm); True when it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict_files(paths: Iterable[str | os.PathLike]) -> str:
    """Take files out of the page cache: ``drop_caches`` where permitted, else
    ``posix_fadvise(DONTNEED)`` on each file (pages still mapped by a process stay; an overlay or
    container file system may ignore the advice: check with :func:`resident_bytes`). Returns the
    method used."""
    if drop_page_cache():
        return "drop_caches"
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def resident_bytes(paths: Iterable[str | os.PathLike]) -> int | None:
    """Bytes of these files in the page cache (util-linux ``fincore``); None where it is missing."""
    args = [os.fspath(p) for p in paths]
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return sum(int(line) for line in out.stdout.split() if line.strip().isdigit())


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or the total size of the files under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def aligned_random_bytes(nbytes: int) -> memoryview:
    """Incompressible bytes in page-aligned memory (``O_DIRECT`` writes need aligned buffers)."""
    import mmap

    buf = mmap.mmap(-1, nbytes)
    view = memoryview(buf)
    step = 64 << 20
    for pos in range(0, nbytes, step):
        view[pos : pos + min(step, nbytes - pos)] = os.urandom(min(step, nbytes - pos))
    return view


def fsync_file(path: str | os.PathLike) -> None:
    """fsync one file or folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or every file and folder under a folder, then the parent folder: what our
    commit does for its own files, applied to contenders that do not fsync."""
    path = Path(path)
    if path.is_dir():
        for folder, _, names in os.walk(path):
            for name in [*names, "."]:
                fsync_file(os.path.join(folder, name))
    else:
        fsync_file(path)
    fsync_file(path.parent)


def disk_write_bandwidth(
    directory: str | os.PathLike,
    *,
    files: int = 2,
    file_mb: int = 256,
    payload: memoryview | None = None,
    direct: bool = False,
) -> float:
    """Fsynced sequential write bandwidth in bytes/s: ``files`` x ``file_mb`` MiB written with one
    ``os.write`` loop per file (16 MiB calls) and an ``os.fsync`` each, into ``directory``.

    ``payload`` (at least ``file_mb`` MiB of incompressible bytes, page-aligned for ``direct``) is
    reused so that the measurement times the disk, not the generation of data. ``direct`` opens
    the files with ``O_DIRECT`` (no page cache: what the device itself sustains); it raises
    ``OSError`` where the file system refuses it. Files are removed afterwards.
    """
    size = file_mb << 20
    if payload is None:
        payload = aligned_random_bytes(size)
    chunk = 16 << 20
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    sync_disk()
    t0 = time.perf_counter()
    try:
        for i in range(files):
            fd = os.open(os.path.join(directory, f"diskbw-{i}.bin"), flags, 0o644)
            try:
                pos = 0
                while pos < size:
                    pos += os.write(fd, payload[pos : min(pos + chunk, size)])
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_file(directory)
        elapsed = time.perf_counter() - t0
    finally:
        for i in range(files):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, f"diskbw-{i}.bin"))
    return files * size / elapsed


def cpu_seconds(include_children: bool = True) -> float:
    """User + system CPU time of this process's threads (and of its live children)."""
    proc = psutil.Process()
    t = proc.cpu_times()
    total = t.user + t.system
    if include_children:
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    return total


# --- memory ------------------------------------------------------------------------------------
def rss_bytes(include_children: bool = True) -> int:
    """Resident memory of this process (plus its children: a writer process counts too)."""
    proc = psutil.Process()
    total = proc.memory_info().rss
    if include_children:
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return total


def pss_bytes() -> int:
    """Proportional set size of this process plus its children: memory shared between them (a
    writer process's shared-memory staging buffers) is counted once, not once per process.
    Reads ``smaps_rollup``: tens of ms for a GB-sized process, so not for timed spans."""
    total = 0
    for pid in ["self", *(c.pid for c in psutil.Process().children(recursive=True))]:
        with contextlib.suppress(OSError):
            m = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
            total += int(m.group(1)) * 1024 if m else 0
    return total


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def peak_rss_reset(pid: int | str = "self") -> bool:
    """Reset the kernel's high-water mark of a process's RSS (VmHWM); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """The kernel's high-water mark of a process's RSS since the last reset (exact, no sampling)."""
    return _status_kb(pid, "VmHWM")


class PeakRss:
    """Peak resident memory over the span of a ``with`` block, from the kernel's own high-water
    marks (VmHWM, reset on entry): exact, and no sampling thread to compete with the code timed.

    Children alive on entry (a writer process) are included: ``peak`` is the sum over this
    process and them of (high-water mark - RSS on entry). ``exact`` is False where the marks
    cannot be reset (then nothing is reported).
    """

    def __enter__(self) -> PeakRss:
        self.pids: list[int | str] = ["self", *(c.pid for c in psutil.Process().children(recursive=True))]
        self.exact = all([peak_rss_reset(pid) for pid in self.pids])
        self.start = {pid: _status_kb(pid, "VmRSS") or 0 for pid in self.pids}
        self.peak: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.exact:
            return
        total = 0
        for pid in self.pids:
            hwm = peak_rss_bytes(pid)
            if hwm is not None:
                total += hwm - self.start[pid]
        self.peak = total


class RssSampler:
    """Samples RSS (this process + children) every ``interval`` s on a daemon thread.

    ``with RssSampler() as s: ...`` then ``s.peak`` and ``s.baseline`` (bytes). Own RSS comes from
    ``/proc/self/statm``; the list of children is refreshed every 0.5 s (finding them scans /proc).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _sample(self, children: list[psutil.Process]) -> int:
        with open("/proc/self/statm") as f:
            total = int(f.read().split()[1]) * self._page
        for child in children:
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        me = psutil.Process()
        children: list[psutil.Process] = []
        refreshed = 0.0
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 0.5:
                children, refreshed = me.children(recursive=True), time.monotonic()
            self.peak = max(self.peak, self._sample(children))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_over_baseline(self) -> int:
        return self.peak - self.baseline


# --- the machine -------------------------------------------------------------------------------
class OtherLoad:
    """How busy the CPUs were with *other* processes while a benchmark ran.

    Shared machines make timings noisy; this puts a number on it: the CPU time the whole system
    spent minus what this process (and its children) spent, as a share of all cores.
    """

    def __enter__(self) -> OtherLoad:
        self._sys0 = _busy_cpu_seconds()
        self._own0 = _own_cpu_seconds()
        self._t0 = time.monotonic()
        self.loadavg_start = os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        other = (_busy_cpu_seconds() - self._sys0) - (_own_cpu_seconds() - self._own0)
        self.wall_s = wall
        self.other_cores = max(0.0, other / wall) if wall > 0 else 0.0
        self.loadavg_end = os.getloadavg()[0]

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": self.wall_s,
            "other_processes_cores": self.other_cores,
            "loadavg_1m_start": self.loadavg_start,
            "loadavg_1m_end": self.loadavg_end,
        }


def _busy_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _own_cpu_seconds() -> float:
    proc = psutil.Process()
    t = proc.cpu_times()
    total = t.user + t.system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system
    return total + t.children_user + t.children_system


def machine_info(directory: str | os.PathLike = REPO) -> dict[str, Any]:
    """CPU, memory, disk and library versions, for the results header."""
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    fs = "?"
    with contextlib.suppress(Exception):
        out = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True, timeout=5).stdout
        line = out.strip().splitlines()[-1].split()
        fs = f"{line[1]} on {line[0]}"
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "filesystem": fs,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
    }
    for name in ("lightning", "transformers", "safetensors"):
        with contextlib.suppress(Exception):
            info[name] = __import__(name).__version__
    return info


# --- output ------------------------------------------------------------------------------------
# the columns of both end-to-end tables (Lightning and HF), in the order the rows are built
E2E_COLUMNS = (
    "config",
    "wall s (median)",
    "overhead vs none",
    "overhead, until checkpoints are on disk",
    "CPU s of the process",
    "saves per run",
    "blocked per save, median ms",
    "max ms",
    "checkpoint MB",
)


def verdict(*checks: bool) -> bool | None:
    """True / False when every estimator of a target agrees, None (inconclusive: noise) when they
    do not: on a shared machine a paired median and a best-vs-best ratio can disagree."""
    return checks[0] if all(c == checks[0] for c in checks) else None


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l/r/c), default l then r."""
    headers = list(headers)
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def publish(stem: str, text: str, payload: dict[str, Any]) -> None:
    """Write ``results/<stem>.md`` and ``results/<stem>.json`` and show the report."""
    write_text(RESULTS / f"{stem}.md", text)
    write_json(RESULTS / f"{stem}.json", payload)
    print(text)


def publish_e2e(
    stem: str, text: str, *, headline: list, summary: dict, runs: list, machine: dict, load: Any, opts: Any, rounds: int
) -> None:
    """:func:`publish` for an end-to-end benchmark: its report plus every run and the settings."""
    publish(
        stem,
        text,
        {
            "headline": headline,
            "summary": summary,
            "runs": runs,
            "machine": machine,
            "other_load": load.as_dict(),
            "steps": opts.steps,
            "every": opts.every,
            "rounds": rounds,
        },
    )


def overhead_note(framework_fsync: str) -> str:
    """How the end-to-end benchmarks compute overheads, shared by the Lightning and HF reports."""
    return (
        "Overheads are medians over rounds of (run / the `none` run of the same round - 1); on a shared "
        "machine identical runs still vary by 10-20 %, so read them with the blocked time per save, which "
        'is measured directly. "Until checkpoints are on disk" adds ' + framework_fsync
    )


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=False, default=_jsonable) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text if text.endswith("\n") else text + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def fmt_s(seconds: float | None, digits: int = 3) -> str:
    """Seconds with sensible precision; '-' for missing values."""
    if seconds is None or seconds != seconds:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.{max(0, digits - 2)}f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"
