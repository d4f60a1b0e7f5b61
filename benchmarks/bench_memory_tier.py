"""Benchmark the in-memory tier (docs/memory_tier.md): step overhead, restart time, work lost.

Four measurements, one run, same state:

* **Step-time overhead** of a snapshot every step, on a training loop (an MLP with AdamW; state =
  weights + two Adam moments) at each ``--mib`` size, against the **floor**: one memory copy of the
  same tensors into buffers allocated once, measured alone in the same run, the faster of
  ``Tensor.copy_`` (torch runs on one thread here), a bare ``memmove`` split over one thread per
  core (the library's copy uses every core while ``save()`` blocks, so the floor does too) and,
  where the library's streaming-store copy is compiled, the same split copy with it (the library
  uses it, so the floor does too).
  Three configurations (no save, one ``copy_`` per step, a snapshot per step) run in blocks of
  consecutive steps that take turns, the first step of each block dropped; the added time per
  step (median step with a snapshot minus median step without) and ``save()``'s own stall are
  divided by the floor. Target: <= 1.2x in the default mode.
* **Overlap mode** at the first size, the step on one thread (it leaves a core free), at each
  ``--overlap-batches`` loop shape (default 16 and 256: bound by memory bandwidth, bound by
  computation): steps without a save, steps with a snapshot (written on the writer thread during
  the next step's forward/backward), and the floor of overlap mode, a **bare copy**: a GIL-free
  ``torch._foreach_copy_`` of the state into buffers allocated once, on one reused background
  thread during the forward/backward, waited for where the snapshot is. Target: under 1 % per
  loop shape, as strict at every shape; each target row also reports that shape's floor (where the
  bare copy alone costs the step more than 1 %, no snapshot can meet the target there).
* **Restart to first step**: a new ``CheckpointManager`` on the directory, ``restore("latest")``
  into the model and optimizer, one training step; from memory, from the local disk (page cache
  dropped when allowed, else warm: said in the table), and from S3 (moto server) when the ``s3``
  extra is installed.
* **Work lost per crash**: for seeded random crash moments over a run of N steps, the steps since
  the last restorable state: a snapshot every step vs the disk every K steps, in steps and in
  seconds of the measured step time. (The kill tests prove the snapshot is restorable after a
  SIGKILL; this is the arithmetic of the schedule.)

Run: ``.venv/bin/python benchmarks/bench_memory_tier.py [--mib 64 256] [--blocks 20] [--steps 6]
[--overlap-batches 16,256]``.
Writes ``benchmarks/results/memory_tier.md`` and ``memory_tier.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ckpt_plugins.persist.hashed_copy import STREAMING_COPY

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))

from common import drop_page_cache, machine_info, md_table, publish  # noqa: E402

OVERLAP_BATCHES = [16, 256]  # a loop bound by memory bandwidth, one bound by computation (64 MiB state)


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


def _blocks(configs: dict[str, Callable[[], None]], blocks: int, length: int) -> dict[str, list[float]]:
    """Seconds per step of each configuration, run in blocks of ``length`` consecutive steps that
    take turns (the order rotates from block to block, so a drift of the machine falls on all
    alike). The first step of every block is dropped: it carries what the previous block left
    (an overlapped snapshot still being written, caches another configuration filled)."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for b in range(blocks):
        for name in names[b % len(names) :] + names[: b % len(names)]:
            for i in range(length):
                t0 = time.perf_counter()
                configs[name]()
                if i:
                    times[name].append(time.perf_counter() - t0)
    return times


def _default_mode(tmp: Path, mib: int, args, CheckpointManager) -> dict[str, Any]:
    """Default mode at one state size: step times without a save, with one ``copy_`` of the state
    into buffers allocated once (the floor, in the loop), and with a snapshot every step; the
    floor measured alone too, and ``save()``'s own stall."""
    model, opt = _model(mib)
    x = torch.randn(16, model[0].in_features)
    _step(model, opt, x)  # the optimizer's moments exist from here
    tensors = _tensors(_state(model, opt, 0))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    stalls: list[float] = []
    floor: list[float] = []
    step = 0

    def copy() -> None:
        c0 = time.perf_counter()
        with torch.no_grad():
            for dst, src in zip(buffers, tensors, strict=True):
                dst.copy_(src)
        floor.append(time.perf_counter() - c0)

    mgr = CheckpointManager(tmp / f"run-{mib}", memory_tier=True, persist_every_n_steps=10**9)

    def snapshot() -> None:
        nonlocal step
        _step(model, opt, x)
        step += 1
        stalls.append(mgr.save(step, _state(model, opt, step)).stats["stall_s"])

    def with_copy() -> None:
        _step(model, opt, x)
        copy()

    try:
        _blocks({"no save": lambda: _step(model, opt, x), "copy": with_copy, "snapshot": snapshot}, 3, 3)  # warm-up
        stalls.clear()
        floor.clear()
        times = _blocks(
            {"no save": lambda: _step(model, opt, x), "copy": with_copy, "snapshot": snapshot}, args.blocks, args.steps
        )
        alone, split, streamed = [], [], []
        for _ in range(3 * args.blocks):
            copy()
            alone.append(floor.pop())
            split.append(_split_copy(buffers, tensors, ctypes.memmove))
            if STREAMING_COPY is not None:
                streamed.append(_split_copy(buffers, tensors, STREAMING_COPY))
    finally:
        mgr.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_s = min(statistics.median(x) for x in (alone, split, streamed) if x)  # the fastest way to copy here
    return {
        "mib": mib,
        "bytes": nbytes,
        "step_s": times,
        "median_step_s": med,
        "stall_s": stalls,
        "floor_in_loop_s": floor,
        "floor_alone_s": alone,
        "floor_split_s": split,
        "floor_streamed_s": streamed,
        "split_threads": _cores(),
        "floor_s": floor_s,
        "added_s": med["snapshot"] - med["no save"],
        "copy_added_s": med["copy"] - med["no save"],
        "added_ratio": (med["snapshot"] - med["no save"]) / floor_s,
        "stall_ratio": statistics.median(stalls) / floor_s,
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _split_copy(buffers: list[torch.Tensor], tensors: list[torch.Tensor], byte_copy) -> float:
    """The state's bytes copied by ``byte_copy(dst, src, nbytes)`` split in equal contiguous parts
    over one thread per core (the bench runs torch on one thread, so its ``copy_`` uses one core;
    the library's copy uses every core while ``save()`` blocks, so the floor must too). Seconds."""
    import threading

    runs = [(d.data_ptr(), s.data_ptr(), s.numel() * s.element_size()) for d, s in zip(buffers, tensors, strict=True)]
    total, parts = sum(n for _, _, n in runs), _cores()

    def part(j: int) -> None:
        lo, hi, pos = total * j // parts, total * (j + 1) // parts, 0
        for dst, src, n in runs:
            a, b = max(lo, pos), min(hi, pos + n)
            if b > a:
                byte_copy(dst + a - pos, src + a - pos, b - a)
            pos += n

    helpers = [threading.Thread(target=part, args=(j,)) for j in range(1, parts)]
    t0 = time.perf_counter()
    for h in helpers:
        h.start()
    part(0)
    for h in helpers:
        h.join()
    return time.perf_counter() - t0


def _overlap_mode(tmp: Path, mib: int, batch: int, args, CheckpointManager) -> dict[str, Any]:
    """Overlap mode at one loop shape (``batch`` rows through the MLP of a ``mib`` state), the step
    on one thread so that it leaves a core free. Three configurations take turns in blocks:

    * **no save**: the step alone (it still calls ``wait_for_snapshot()``, which returns at once);
    * **overlap**: every step ends with a snapshot, written on the writer thread during the next
      step's forward/backward (``wait_for_snapshot()`` before ``optimizer.step()``);
    * **bare copy**, the physical floor of overlap mode: every step starts, on one background
      thread reused for every step, a ``torch._foreach_copy_`` of the state's tensors into buffers
      allocated once (GIL-free, no hash, no file, no manifest), and waits for it where the overlap
      step waits for its snapshot. What that copy costs the step is the price of moving the state
      through memory beside the training; ours minus it is what the snapshot adds on top.

    A small batch leaves the loop bound by memory bandwidth (the copy on the other core slows it
    whatever holds the GIL); a large one makes it bound by computation (the copy fits beside it)."""
    model, opt = _model(mib)
    x = torch.randn(batch, model[0].in_features)
    _step(model, opt, x)
    tensors = _tensors(_state(model, opt, 0))
    buffers = [torch.empty_like(t) for t in tensors]
    mgr = CheckpointManager(
        tmp / f"overlap-{mib}-{batch}",
        memory_tier=True,
        persist_every_n_steps=10**9,
        async_save=True,
        snapshot="overlap",
    )
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bare-copy")  # one thread, every step
    step = 0
    waits: dict[str, list[float]] = {"overlap": [], "bare copy": []}

    def timed(name: str, wait: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            w0 = time.perf_counter()
            wait()
            waits[name].append(time.perf_counter() - w0)

        return run

    def copy_state() -> None:
        with torch.no_grad():
            torch._foreach_copy_(buffers, tensors)

    def plain() -> None:
        _step(model, opt, x, mgr.wait_for_snapshot)

    def snapshot() -> None:
        nonlocal step
        _step(model, opt, x, timed("overlap", mgr.wait_for_snapshot))
        step += 1
        mgr.save(step, _state(model, opt, step))

    def bare_copy() -> None:
        copying = pool.submit(copy_state)
        _step(model, opt, x, timed("bare copy", copying.result))

    configs = {"no save": plain, "overlap": snapshot, "bare copy": bare_copy}
    try:
        _blocks(configs, 3, 3)  # warm-up
        for v in waits.values():
            v.clear()
        times = _blocks(configs, args.blocks, args.steps)
    finally:
        mgr.close()
        pool.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = 100 * (med["overlap"] - med["no save"]) / med["no save"]
    floor = 100 * (med["bare copy"] - med["no save"]) / med["no save"]
    return {
        "mib": mib,
        "batch": batch,
        "step_s": times,
        "median_step_s": med,
        "wait_s": waits,
        "overhead_pct": overhead,
        "floor_pct": floor,
        "above_floor_pct": overhead - floor,
    }


def _batches(text: str) -> list[int]:
    """``"16,256"`` -> ``[16, 256]`` (``--overlap-batches`` takes commas, spaces, or both)."""
    return [int(b) for b in text.split(",") if b.strip()]


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


def _tensors(state: dict) -> list[torch.Tensor]:
    from ckpt_plugins.tree.codec import flatten_state

    return list(flatten_state(state).tensors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mib",
        type=int,
        nargs="+",
        default=[64, 256],
        help="state sizes (weights + AdamW moments); the first one also runs the overlap mode and the restarts",
    )
    parser.add_argument("--blocks", type=int, default=20, help="blocks per configuration (they take turns)")
    parser.add_argument("--steps", type=int, default=6, help="steps per block (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=5, help="restarts per tier")
    parser.add_argument("--persist", type=int, default=50, help="K: the disk every K steps")
    parser.add_argument(
        "--overlap-batches",
        type=_batches,
        nargs="+",
        metavar="B[,B...]",
        default=None,
        help="batch sizes of the overlap-mode loop (e.g. 16,256 or 16 256): a small one leaves the step bound "
        "by memory bandwidth, a large one by computation",
    )
    args = parser.parse_args(argv)
    args.overlap_batches = [b for group in args.overlap_batches or [OVERLAP_BATCHES] for b in group]
    from ckpt_plugins import CheckpointManager

    started = time.time()
    load_before = os.getloadavg()
    # One thread for the step and the floor: on the shared 2-core machine a 2-thread step swung from
    # 30 ms to 500 ms between rounds (threads spinning against other jobs), drowning the effect.
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        default = [_default_mode(tmp, mib, args, CheckpointManager) for mib in args.mib]
        for d in default:
            print(
                f"{d['mib']} MiB: step {d['median_step_s']['no save'] * 1e3:.1f} ms, + snapshot "
                f"{d['added_s'] * 1e3:+.2f} ms ({d['added_ratio']:.2f}x floor), stall "
                f"{statistics.median(d['stall_s']) * 1e3:.2f} ms ({d['stall_ratio']:.2f}x), "
                f"floor {d['floor_s'] * 1e3:.2f} ms",
                flush=True,
            )
        overlaps = []
        for batch in args.overlap_batches:
            o = _overlap_mode(tmp, args.mib[0], batch, args, CheckpointManager)
            overlaps.append(o)
            print(
                f"overlap, {o['mib']} MiB, batch {batch}: step {o['median_step_s']['no save'] * 1e3:.1f} ms, "
                f"overlap {o['overhead_pct']:+.2f} %, bare copy (floor) {o['floor_pct']:+.2f} %, "
                f"ours - floor {o['above_floor_pct']:+.2f} points",
                flush=True,
            )
        model, opt = _model(args.mib[0])
        x = torch.randn(16, model[0].in_features)
        _step(model, opt, x)
        restart = _restart_times(tmp, model, opt, x, args, CheckpointManager)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

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
    step_s = default[0]["median_step_s"]["snapshot"]

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms"

    rows = []
    for d in default:
        med = d["median_step_s"]
        rows += [
            (f"**{d['mib']} MiB**: training step, no save", ms(med["no save"]), "-"),
            (
                "same + snapshot every step: added per step",
                f"{d['added_s'] * 1e3:+.2f} ms",
                f"**{d['added_ratio']:.2f}x**",
            ),
            ("`save()` stall (the snapshot)", ms(statistics.median(d["stall_s"])), f"{d['stall_ratio']:.2f}x"),
            (
                "same + one `copy_` of the state: added per step",
                f"{d['copy_added_s'] * 1e3:+.2f} ms",
                f"{d['copy_added_s'] / d['floor_s']:.2f}x",
            ),
            (
                "one `copy_` of the state into buffers allocated once (torch on 1 thread), alone",
                ms(statistics.median(d["floor_alone_s"])),
                f"{statistics.median(d['floor_alone_s']) / d['floor_s']:.2f}x",
            ),
            (
                f"`memmove` of the state split over {d.get('split_threads', 1)} threads, alone",
                ms(statistics.median(d["floor_split_s"])) if d.get("floor_split_s") else "-",
                f"{statistics.median(d['floor_split_s']) / d['floor_s']:.2f}x" if d.get("floor_split_s") else "-",
            ),
            (
                "the same split copy with streaming stores (`persist/_stream_copy`), alone",
                ms(statistics.median(d["floor_streamed_s"])) if d.get("floor_streamed_s") else "not compiled",
                f"{statistics.median(d['floor_streamed_s']) / d['floor_s']:.2f}x" if d.get("floor_streamed_s") else "-",
            ),
            ("floor: the fastest of those", ms(d["floor_s"]), "1.00x"),
        ]
    overlap_rows = []
    for o in overlaps:
        omed = o["median_step_s"]
        overlap_rows += [
            (f"**batch {o['batch']}**: training step on 1 thread, no save", ms(omed["no save"]), "-"),
            ("same + snapshot every step, overlap mode", ms(omed["overlap"]), f"**{o['overhead_pct']:+.2f} %**"),
            (
                "same + bare copy every step (`torch._foreach_copy_` on the free core): the floor",
                ms(omed["bare copy"]),
                f"{o['floor_pct']:+.2f} %",
            ),
            ("overlap mode minus the floor", "-", f"{o['above_floor_pct']:+.2f} points"),
            ("wait_for_snapshot() before optimizer.step", ms(statistics.median(o["wait_s"]["overlap"])), "-"),
            ("wait for the bare copy before optimizer.step", ms(statistics.median(o["wait_s"]["bare copy"])), "-"),
        ]
    restart_rows = [
        (name, f"{seconds:.3f} s", f"{seconds / restart['memory: restore only' if ':' in name else 'memory']:.1f}x")
        for name, seconds in restart.items()
        if seconds is not None
    ]
    lost_rows = [(name, f"{v:.2f} steps", f"{v * step_s:.2f} s") for name, v in lost.items()]
    samples = sum(len(v) for v in default[0]["step_s"].values()) // 3
    headline = [
        {
            "target": f"snapshot every step, {d['mib']} MiB state: step-time overhead <= 1.2x the floor "
            "(one memory copy of the state)",
            "measured": f"{d['added_ratio']:.2f}x (save() stall {d['stall_ratio']:.2f}x)",
            "met": d["added_ratio"] <= 1.2,
            "note": f"medians of {samples} steps per configuration, blocks taking turns",
        }
        for d in default
    ]
    headline += [
        {
            "target": "overlap mode, a step that leaves a core free: step-time overhead under 1 % "
            f"(batch {o['batch']})",
            "measured": f"{o['overhead_pct']:+.2f} % (bare-copy floor {o['floor_pct']:+.2f} %)",
            "met": o["overhead_pct"] < 1.0,
            "note": f"{o['mib']} MiB, batch {o['batch']}, step {o['median_step_s']['no save'] * 1e3:.0f} ms "
            f"on 1 thread; floor (bare copy on the free core) {o['floor_pct']:+.1f} %, "
            f"ours - floor {o['above_floor_pct']:+.1f} points",
        }
        for o in overlaps
    ]
    headline += [
        {
            "target": "restart to first step: memory faster than the local disk",
            "measured": f"memory {restart['memory']:.3f} s, disk {restart['local disk']:.3f} s",
            "met": restart["memory"] < restart["local disk"],
            "note": restart_note(),
        },
    ]
    command = "`.venv/bin/python benchmarks/bench_memory_tier.py" + "".join(
        f" --{name.replace('_', '-')} {value if not isinstance(value, list) else ' '.join(map(str, value))}"
        for name, value in vars(args).items()
        if value != (OVERLAP_BATCHES if name == "overlap_batches" else parser.get_default(name))
    )
    text = "\n".join(
        [
            "# In-memory tier",
            "",
            f"State sizes {', '.join(f'{m} MiB' for m in args.mib)} (an MLP's weights and AdamW moments); torch on one "
            f"thread; snapshots in /dev/shm (tmpfs). Each configuration runs in blocks of {args.steps} steps that "
            f"take turns ({args.blocks} blocks each, the first step of a block dropped); figures are medians over "
            f"the steps. Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
            "",
            "## Step time with a snapshot every step (default mode)",
            "",
            "The ratio column divides by the floor measured alone.",
            "",
            md_table(["", "median", "vs floor"], rows),
            "",
            '## Overlap mode (`async_save=True, snapshot="overlap"`), the step on one thread',
            "",
            f"State {args.mib[0]} MiB, one loop shape per batch size. Three configurations take turns: no save, "
            "a snapshot every step (written on the writer thread during the next step's forward/backward), and "
            "the floor: a bare `torch._foreach_copy_` of the state into buffers allocated once, started on one "
            "reused background thread at the start of every step and waited for before `optimizer.step()` "
            "(no hash, no file, no manifest, no Python work while it runs). The floor is what moving the state "
            "through memory beside the step costs; a memory-bound loop pays it whatever the snapshot does.",
            "",
            md_table(["", "median", "vs no save"], overlap_rows),
            "",
            "## Targets",
            "",
            md_table(
                ["target", "measured", "met", "note"],
                [(h["target"], h["measured"], "met" if h["met"] else "**not met**", h["note"]) for h in headline],
                align="lrrl",
            ),
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
            f"Command: {command}`",
        ]
    )
    publish(
        "memory_tier",
        text,
        {
            "headline": headline,
            "default_mode": default,
            "overlap_mode": overlaps,
            "restart_s": restart,
            "lost_steps": lost,
            "load": {"before": load_before, "after": load_after},
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
