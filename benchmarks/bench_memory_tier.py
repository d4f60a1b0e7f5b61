"""Benchmark the in-memory tier (docs/memory_tier.md): step overhead, restart time, work lost.

Three measurements, one run, same state:

* **Step-time overhead** of a snapshot every step, on a training loop (an MLP with AdamW; state =
  weights + two Adam moments), against the **floor**: one memory copy of the same tensors into
  buffers allocated once (``Tensor.copy_``), measured in the same rounds. Reported: the added time
  per step (loop with ``mgr.save`` every step minus the loop without) and ``save()``'s own stall,
  each as a ratio to the floor (paired per round, median). Target: <= 1.2x in the default mode.
* **Restart to first step**: a new ``CheckpointManager`` on the directory, ``restore("latest")``
  into the model and optimizer, one training step; from memory, from the local disk (page cache
  dropped when allowed, else warm: said in the table), and from S3 (moto server) when the ``s3``
  extra is installed.
* **Work lost per crash**: for seeded random crash moments over a run of N steps, the steps since
  the last restorable state: a snapshot every step vs the disk every K steps, in steps and in
  seconds of the measured step time. (The kill tests prove the snapshot is restorable after a
  SIGKILL; this is the arithmetic of the schedule.)

Run: ``.venv/bin/python benchmarks/bench_memory_tier.py [--mib 64] [--rounds 5] [--persist 50]``.
Writes ``benchmarks/results/memory_tier.md`` and ``memory_tier.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))

from common import drop_page_cache, machine_info, md_table, publish  # noqa: E402


def _model(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP whose weights are about ``mib / 3`` MiB (AdamW's moments make the state ``mib``)."""
    torch.manual_seed(0)
    width = int(((mib << 20) / 3 / 4 / 4) ** 0.5)  # 4 square layers of float32
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, before_optimizer_step=None) -> None:
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=False)
    loss.backward()
    if before_optimizer_step is not None:
        before_optimizer_step()  # overlap mode: the last snapshot must be complete before the state changes
    opt.step()


def _overlap_rounds(tmp: Path, model, opt, x, args, CheckpointManager) -> dict[str, list[float]]:
    """Overlap mode on a loop whose step leaves a core free (the step on one thread): per round,
    the step without saving and the step with a snapshot every step written on the writer thread
    during the next forward/backward (``wait_for_snapshot()`` before ``optimizer.step()``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, list[float]] = {"base_step_1t": [], "overlap_step_1t": [], "overlap_wait": []}
    mgr = CheckpointManager(
        tmp / "overlap", memory_tier=True, persist_every_n_steps=10**9, async_save=True, snapshot="overlap"
    )
    step = 0
    waits: list[float] = []

    def wait() -> None:
        w0 = time.perf_counter()
        mgr.wait_for_snapshot()
        waits.append(time.perf_counter() - w0)

    try:
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(model, opt, x)
            base = (time.perf_counter() - t0) / args.steps
            waits.clear()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(model, opt, x, wait)
                step += 1
                mgr.save(step, _state(model, opt, step))
            mgr.wait_for_snapshot()
            snap = (time.perf_counter() - t0) / args.steps
            if r == 0:
                continue
            out["base_step_1t"].append(base)
            out["overlap_step_1t"].append(snap)
            out["overlap_wait"].append(statistics.median(waits))
            print(
                f"overlap round {r}: step (1 thread) {base * 1e3:.1f} ms, with an overlapped snapshot "
                f"{snap * 1e3:.1f} ms, wait before optimizer.step {out['overlap_wait'][-1] * 1e3:.2f} ms",
                flush=True,
            )
    finally:
        mgr.close()
        torch.set_num_threads(threads)
    return out


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


def _tensors(state: dict) -> list[torch.Tensor]:
    from ckpt_plugins.tree.codec import flatten_state

    return list(flatten_state(state).tensors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="state size (weights + AdamW moments)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per measured loop")
    parser.add_argument("--persist", type=int, default=50, help="K: the disk every K steps")
    args = parser.parse_args(argv)
    from ckpt_plugins import CheckpointManager

    started = time.time()
    # One thread for the step and the floor: on the shared 2-core machine a 2-thread step swung from
    # 30 ms to 500 ms between rounds (threads spinning against other jobs), drowning the effect.
    torch.set_num_threads(1)
    model, opt = _model(args.mib)
    x = torch.randn(16, model[0].in_features)
    _step(model, opt, x)  # the optimizer's moments exist from here
    tensors = _tensors(_state(model, opt, 0))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    samples: dict[str, list[float]] = {"base_step": [], "snapshot_step": [], "stall": [], "floor": []}
    mgr = CheckpointManager(tmp / "run", memory_tier=True, persist_every_n_steps=10**9)
    step = 0
    try:
        for r in range(args.rounds + 1):  # round 0 warms up (allocations, first files)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(model, opt, x)
            base = (time.perf_counter() - t0) / args.steps
            stalls = []
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _step(model, opt, x)
                step += 1
                handle = mgr.save(step, _state(model, opt, step))
                stalls.append(handle.stats["stall_s"])
            snap = (time.perf_counter() - t0) / args.steps
            copies = []
            for _ in range(args.steps):
                c0 = time.perf_counter()
                with torch.no_grad():
                    for dst, src in zip(buffers, tensors, strict=True):
                        dst.copy_(src)
                copies.append(time.perf_counter() - c0)
            if r == 0:
                continue
            samples["base_step"].append(base)
            samples["snapshot_step"].append(snap)
            samples["stall"].append(statistics.median(stalls))
            samples["floor"].append(statistics.median(copies))
            print(
                f"round {r}: step {base * 1e3:.1f} ms, with a snapshot {snap * 1e3:.1f} ms, "
                f"stall {samples['stall'][-1] * 1e3:.1f} ms, floor (one copy) {samples['floor'][-1] * 1e3:.1f} ms",
                flush=True,
            )
        added = [
            max(0.0, s - b) / f
            for s, b, f in zip(samples["snapshot_step"], samples["base_step"], samples["floor"], strict=True)
        ]
        stall_ratio = statistics.median(s / f for s, f in zip(samples["stall"], samples["floor"], strict=True))
        added_ratio = statistics.median(added)
        samples.update(_overlap_rounds(tmp, model, opt, x, args, CheckpointManager))
        overlap_pct = statistics.median(
            100 * (s - b) / b for s, b in zip(samples["overlap_step_1t"], samples["base_step_1t"], strict=True)
        )
        med = {k: statistics.median(v) for k, v in samples.items()}

        # --- restart to the first step ---------------------------------------------------------
        mgr.close()  # persists the newest snapshot to the disk and frees the memory
        restart = _restart_times(tmp, model, opt, x, args, CheckpointManager)
    finally:
        if not mgr._closed:
            mgr.close()
        shutil.rmtree(tmp, ignore_errors=True)

    # --- work lost per crash ---------------------------------------------------------------------
    rng = random.Random(1234)
    n, k = 10 * args.persist, args.persist
    crashes = [rng.uniform(0, n) for _ in range(1000)]  # in steps (a fraction: inside a step)
    lost_memory = [c - int(c) for c in crashes]  # the step under way; every finished step is restorable
    lost_disk = [c - (int(c) // k) * k for c in crashes]  # back to the last multiple of K
    lost = {
        "memory every step": statistics.mean(lost_memory),
        f"disk every {k} steps": statistics.mean(lost_disk),
    }
    step_s = med["snapshot_step"]

    rows = [
        ("training step, no save", f"{med['base_step'] * 1e3:.1f} ms", "-"),
        ("training step + snapshot every step", f"{med['snapshot_step'] * 1e3:.1f} ms", f"+{added_ratio:.2f}x floor"),
        ("save() stall (the snapshot)", f"{med['stall'] * 1e3:.1f} ms", f"{stall_ratio:.2f}x floor"),
        ("floor: one memory copy of the state", f"{med['floor'] * 1e3:.1f} ms", "1.00x"),
    ]
    overlap_rows = [
        ("training step on 1 thread, no save", f"{med['base_step_1t'] * 1e3:.1f} ms", "-"),
        (
            "same + snapshot every step, overlap mode",
            f"{med['overlap_step_1t'] * 1e3:.1f} ms",
            f"{overlap_pct:+.2f} %",
        ),
        ("wait_for_snapshot() before optimizer.step", f"{med['overlap_wait'] * 1e3:.2f} ms", "-"),
    ]
    restart_rows = [
        (name, f"{seconds:.3f} s", f"{seconds / restart['memory: restore only' if ':' in name else 'memory']:.1f}x")
        for name, seconds in restart.items()
        if seconds is not None
    ]
    lost_rows = [(name, f"{v:.2f} steps", f"{v * step_s:.2f} s") for name, v in lost.items()]
    headline = [
        {
            "target": "snapshot every step: step-time overhead <= 1.2x the floor (one memory copy of the state)",
            "measured": f"{added_ratio:.2f}x (stall {stall_ratio:.2f}x)",
            "met": added_ratio <= 1.2,
            "note": f"{nbytes / 2**20:.0f} MiB state, median of {args.rounds} paired rounds of {args.steps} steps",
        },
        {
            "target": "overlap mode, a step that leaves a core free: step-time overhead under 1 %",
            "measured": f"{overlap_pct:+.2f} %",
            "met": overlap_pct < 1.0,
            "note": f"median of {args.rounds} paired rounds of {args.steps} steps, the step on 1 thread",
        },
        {
            "target": "restart to first step: memory faster than the local disk",
            "measured": f"memory {restart['memory']:.3f} s, disk {restart['local disk']:.3f} s",
            "met": restart["memory"] < restart["local disk"],
            "note": restart_note(),
        },
    ]
    text = "\n".join(
        [
            "# In-memory tier",
            "",
            f"State: {nbytes / 2**20:.0f} MiB (an MLP's weights and AdamW moments), {args.rounds} rounds of "
            f"{args.steps} steps after one warm-up; ratios are per round, then the median. Snapshots go to "
            "/dev/shm (tmpfs).",
            "",
            "## Step time with a snapshot every step",
            "",
            md_table(["", "median", "vs floor"], rows),
            "",
            '## Overlap mode (`async_save=True, snapshot="overlap"`), the step on one thread',
            "",
            md_table(["", "median", "vs no save"], overlap_rows),
            "",
            "## Restart to the first training step",
            "",
            'A new manager, `restore("latest")` into the model and optimizer (checksums verified), one '
            f"step; then the restore alone. {restart_note()[0].upper() + restart_note()[1:]}.",
            "",
            md_table(["from", "median", "vs memory"], restart_rows),
            "",
            f"## Work lost per crash ({len(crashes)} seeded crash moments over {n} steps)",
            "",
            md_table(["restorable state", "mean lost", f"at {step_s * 1e3:.0f} ms/step"], lost_rows),
            "",
            "Every sample (seconds): " + ", ".join(f"{k} {[f'{x:.4f}' for x in v]}" for k, v in samples.items()),
            "",
            "Command: `.venv/bin/python benchmarks/bench_memory_tier.py"
            + (f" --mib {args.mib}" if args.mib != 64 else "")
            + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
            + (f" --steps {args.steps}" if args.steps != 10 else "")
            + (f" --persist {args.persist}" if args.persist != 50 else "")
            + "`",
        ]
    )
    publish(
        "memory_tier",
        text,
        {
            "headline": headline,
            "bytes": nbytes,
            "samples": samples,
            "median_s": med,
            "restart_s": restart,
            "lost_steps": lost,
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "elapsed_s": time.time() - started,
        },
    )
    return 0


_COLD: list[bool] = []


def restart_note() -> str:
    if _COLD and all(_COLD):
        if not _EVICTION:
            return "the page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`, as root) before each disk restart"
        return (
            "the disk checkpoint's pages evicted before each disk restart with posix_fadvise(DONTNEED) "
            "(drop_caches not permitted); mincore counted 0 of its pages resident afterwards"
        )
    if _EVICTION:
        return f"disk partly warm: posix_fadvise(DONTNEED) left {max(_EVICTION)} pages resident (mincore)"
    return "disk reads from a warm page cache"


def _restart_times(tmp: Path, model, opt, x, args, CheckpointManager) -> dict[str, float | None]:
    """Median seconds from a new manager to the end of the first step, per tier."""
    step = 10**6
    times: dict[str, list[float]] = {"memory": [], "local disk": [], "s3 (moto)": []}
    restores: dict[str, list[float]] = {k: [] for k in times}
    s3 = _s3()
    try:
        with CheckpointManager(tmp / "restart", memory_tier=True, persist_every_n_steps=step) as mgr:
            mgr.save(step, _state(model, opt, step))  # a persisted step (a multiple of K) ...
            mgr.save(step + 1, _state(model, opt, step + 1))  # ... and a newer one in memory only
            mgr._memory = None  # leave the memory as after a crash (close() would persist and free it)
        if s3 is not None:
            with CheckpointManager(s3[0], storage_options=s3[1]) as remote:
                remote.save(step, _state(model, opt, step))
        for _ in range(args.rounds):
            for name in ("memory", "local disk", "s3 (moto)"):
                if name == "s3 (moto)" and s3 is None:
                    continue
                if name == "local disk":
                    _COLD.append(drop_page_cache() or _evict(tmp / "restart"))
                t0 = time.perf_counter()
                if name == "memory":
                    mgr = CheckpointManager(
                        tmp / "restart", memory_tier=True, persist_every_n_steps=step, read_only=True
                    )
                elif name == "local disk":
                    mgr = CheckpointManager(tmp / "restart", read_only=True)
                else:
                    mgr = CheckpointManager(s3[0], storage_options=s3[1], read_only=True)
                mgr.restore("latest", target={"model": model, "optimizer": opt})
                t1 = time.perf_counter()
                _step(model, opt, x)
                times[name].append(time.perf_counter() - t0)
                restores[name].append(t1 - t0)
                assert mgr.restored_step == (step + 1 if name == "memory" else step), (name, mgr.restored_step)
                mgr.close()
    finally:
        from ckpt_plugins.memory.place import snapshot_root

        shutil.rmtree(snapshot_root("/dev/shm", str(tmp / "restart")), ignore_errors=True)
        if s3 is not None:
            s3[2].stop()
    out = {k: (statistics.median(v) if v else None) for k, v in times.items()}
    out.update({f"{k}: restore only": (statistics.median(v) if v else None) for k, v in restores.items()})
    return out


def _evict(folder: Path) -> bool:
    """Evict the files under ``folder`` from the page cache (``POSIX_FADV_DONTNEED`` on clean,
    fsynced pages: no root needed), so that the disk restore reads the disk; True when no page of
    them is resident afterwards (checked with ``mincore``: some file systems ignore the advice)."""
    resident = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                resident += _resident_pages(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
    _EVICTION.append(resident)
    return resident == 0


_EVICTION: list[int] = []  # pages still resident after each eviction


def _resident_pages(fd: int, size: int) -> int:
    """Pages of the open file ``fd`` in the page cache (``mincore`` on a read-only mapping)."""
    import ctypes
    import mmap

    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return 0
    try:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
            return 0
        return sum(v & 1 for v in vec)
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))


def _s3():
    """``(url, storage_options, server)`` of a fresh bucket on a moto server, or None without the s3 extra."""
    try:
        import s3fs  # noqa: F401

        from s3_server import start_s3_server
    except ImportError:
        return None
    server = start_s3_server()
    os.environ.update(server.env)
    bucket = f"bench-memory-{os.getpid()}"
    server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run", server.storage_options(), server


if __name__ == "__main__":
    sys.exit(main())
