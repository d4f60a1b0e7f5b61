"""Sharded saves at 2 ranks: ours against ``torch.distributed.checkpoint`` (DCP), in one run.

The same FSDP2 (``fully_shard``) state, model plus Adam state as DTensors, is saved by two real
gloo ranks (processes on one host, CPU) with:

- ``dcp.save`` and ``dcp.async_save`` (DCP's ``FileSystemWriter``, which fsyncs);
- ours, sharded: ``CheckpointManager.save(step, state)`` of the DTensor state, sync and async;
  measured when the installed ``CheckpointManager`` accepts DTensors (the sharded save of issue
  15), otherwise reported as not available;
- ours after a full gather: ``get_model_state_dict``/``get_optimizer_state_dict`` with
  ``full_state_dict=True, cpu_offload=True`` (a collective), then rank 0's state saved by
  ``CheckpointManager.save``, sync and async: what a user of this package could do before;
- the floors, per rank and in the same round: one copy of the rank's local shards into allocated
  memory (the stall floor of an async save), and one fsynced sequential write of that many bytes
  (the durable floor).

Stall is the time ``save()`` blocks the training loop, durable the time until the checkpoint is
committed and fsynced; both are the slower of the two ranks (training waits for the slowest).
Rounds are interleaved and rotated (one warm-up round, then ``--reps``); medians with min-max, and
ratios per round to DCP's matching call and to the floor of the same round.

Usage::

    .venv/bin/python benchmarks/bench_sharded_dcp.py            # ~3 min on an idle 2-core box
    .venv/bin/python benchmarks/bench_sharded_dcp.py --quick    # a smoke run (tiny state)

Writes ``results/sharded_dcp.{md,json}`` and the figures block of ``docs/sharded.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    REPO,
    TMP,
    OtherLoad,
    fmt_ratio,
    fmt_s,
    free_port,
    machine_info,
    md_table,
    median,
    publish,
    spread,
)

STEM = "sharded_dcp"
DOC = REPO / "docs" / "sharded.md"
BEGIN, END = "<!-- sharded_dcp results: begin -->", "<!-- sharded_dcp results: end -->"
ORDER = [
    "floor",
    "dcp.save",
    "dcp.async_save",
    "ours sharded sync",
    "ours sharded async",
    "full gather + ours sync",
    "full gather + ours async",
]
ANCHOR = {  # the DCP call each contender is compared with
    "ours sharded sync": "dcp.save",
    "ours sharded async": "dcp.async_save",
    "full gather + ours sync": "dcp.save",
    "full gather + ours async": "dcp.async_save",
}


# ----------------------------------------------------------------------------- one rank's process


def _model_and_state(params_mb: float) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = 1024
    layers = max(1, round(params_mb * 2**20 / 4 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, width)).pow(2).mean().backward()
    opt.step()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    return model, opt, state


def _local_tensors(state: Any) -> list[Any]:
    import torch
    from torch.distributed.tensor import DTensor

    out = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
        elif isinstance(node, DTensor):
            out.append(node.to_local())
        elif isinstance(node, torch.Tensor):
            out.append(node)

    walk(state)
    return out


class Floor:
    """One copy of the local shards into allocated buffers; one fsynced write of as many bytes."""

    def __init__(self, state: Any, workdir: Path, rank: int) -> None:
        import torch

        self.local = [t for t in _local_tensors(state) if t.numel()]
        self.buffers = [torch.empty_like(t) for t in self.local]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.local)
        self.payload = os.urandom(min(self.nbytes, 16 << 20))
        self.path = workdir / f"floor_{rank}.bin"

    def run(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        for src, dst in zip(self.local, self.buffers, strict=True):
            dst.copy_(src)
        copy_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = self.nbytes
            while left > 0:
                left -= os.write(fd, self.payload[: min(left, len(self.payload))])
            os.fsync(fd)
        finally:
            os.close(fd)
        return copy_s, time.perf_counter() - t0


def _contenders(model: Any, opt: Any, state: Any, workdir: Path, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from ckpt_plugins import CheckpointManager

    counter = {"i": 0}

    def path(name: str) -> str:
        counter["i"] += 1
        return str(workdir / f"{name.replace(' ', '_')}_{counter['i']}")

    def dcp_sync() -> tuple[float, float]:
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=path("dcp"))
        return (time.perf_counter() - t0,) * 2  # type: ignore[return-value]

    def dcp_async() -> tuple[float, float]:
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=path("dcp_async"))
        stall = time.perf_counter() - t0
        (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
        return stall, time.perf_counter() - t0

    managers: dict[str, Any] = {}

    def ours(async_save: bool, gather: bool):
        key = f"{'gather' if gather else 'sharded'}_{'async' if async_save else 'sync'}"
        managers[key] = CheckpointManager(workdir / key, keep_last=1, async_save=async_save)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        step = {"n": 0}

        def run() -> tuple[float, float]:
            step["n"] += 1
            t0 = time.perf_counter()
            if gather:
                saved = {
                    "model": get_model_state_dict(model, options=full),
                    "optim": get_optimizer_state_dict(model, opt, options=full),
                }
            else:
                saved = state
            handle = managers[key].save(step["n"], saved)
            stall = time.perf_counter() - t0
            handle.wait()
            return stall, time.perf_counter() - t0

        return run

    out = {
        "dcp.save": dcp_sync,
        "dcp.async_save": dcp_async,
        "full gather + ours sync": ours(False, True),
        "full gather + ours async": ours(True, True),
    }
    if _ours_takes_dtensors(state, workdir):
        out["ours sharded sync"] = ours(False, False)
        out["ours sharded async"] = ours(True, False)
    out["_managers"] = managers
    return out


def _ours_takes_dtensors(state: Any, workdir: Path) -> bool:
    """Whether this CheckpointManager saves a DTensor state (issue 15's sharded save); every rank
    tries once, and all must agree (the save's own agreement makes the answer the same)."""
    from ckpt_plugins import CheckpointManager
    from ckpt_plugins.errors import UnsupportedStateError

    try:
        with CheckpointManager(workdir / "probe") as mgr:
            mgr.save(0, state)
        return True
    except UnsupportedStateError:
        return False


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    workdir = Path(args.workdir)
    model, opt, state = _model_and_state(args.params_mb)
    floor = Floor(state, workdir, rank)
    runs = _contenders(model, opt, state, workdir, rank)
    managers = runs.pop("_managers")
    names = [n for n in ORDER if n in runs or n == "floor"]
    rounds: list[dict[str, Any]] = []
    for r in range(args.reps + 1):  # round 0 is the warm-up
        order = names[r % len(names) :] + names[: r % len(names)]
        row: dict[str, Any] = {}
        for name in order:
            dist.barrier()
            if rank == 0:
                os.sync()
            dist.barrier()
            stall, durable = floor.run() if name == "floor" else runs[name]()
            both = [None, None]
            dist.all_gather_object(both, (stall, durable))  # the benchmark's own exchange, untimed
            row[name] = {"stall": max(b[0] for b in both), "durable": max(b[1] for b in both)}
            dist.barrier()
            if rank == 0:
                for p in workdir.iterdir():
                    if p.name.startswith("dcp"):
                        shutil.rmtree(p, ignore_errors=True)
        if r > 0:
            rounds.append(row)
        if rank == 0:
            print(f"round {r}: " + ", ".join(f"{k} {v['durable']:.3f}s" for k, v in row.items()), flush=True)
    for mgr in managers.values():
        mgr.close()
    import ckpt_plugins

    package = Path(ckpt_plugins.__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(package), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    local = [floor.nbytes, 0]
    dist.all_gather_object(local, floor.nbytes)
    if rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "rounds": rounds,
                    "contenders": names,
                    "ours_sharded": "ours sharded sync" in runs,
                    "local_bytes": local,
                    "params_mb": args.params_mb,
                    "package": str(package),
                    "commit": commit.stdout.strip() or "?",
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the parent


def _launch(args: argparse.Namespace, workdir: Path, out: Path) -> None:
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        # a PYTHONPATH already set comes first: the package under test can be another checkout
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p),
    }
    cmd = [sys.executable, __file__, "--worker", "--workdir", str(workdir), "--out", str(out)]
    cmd += ["--params-mb", str(args.params_mb), "--reps", str(args.reps)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}) for r in (0, 1)]
    codes = [p.wait(timeout=3600) for p in procs]
    if codes != [0, 0]:
        raise SystemExit(f"a rank failed: exit codes {codes}")


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    rounds = raw["rounds"]
    table: dict[str, Any] = {}
    for name in raw["contenders"]:
        stalls = [r[name]["stall"] for r in rounds]
        durables = [r[name]["durable"] for r in rounds]
        entry = {
            "stall_s": median(stalls),
            "stall_range": spread(stalls),
            "durable_s": median(durables),
            "durable_range": spread(durables),
        }
        if name != "floor":
            entry["durable_x_floor"] = median(r[name]["durable"] / r["floor"]["durable"] for r in rounds)
        anchor = ANCHOR.get(name)
        if anchor:
            entry["stall_x_dcp"] = median(r[name]["stall"] / r[anchor]["stall"] for r in rounds)
            entry["durable_x_dcp"] = median(r[name]["durable"] / r[anchor]["durable"] for r in rounds)
        table[name] = entry
    return table


def headline(raw: dict[str, Any], table: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    targets = (("ours sharded async", "stall"), ("ours sharded sync", "durable"), ("ours sharded async", "durable"))
    for name, what in targets:
        target = f"{name}: {what} at most DCP's ({ANCHOR[name]})"
        if name not in table:
            note = "ours has no sharded save yet"
            rows.append({"target": target, "measured": "not measured", "met": None, "note": note})
            continue
        ratio = table[name][f"{what}_x_dcp"]
        rows.append({"target": target, "measured": fmt_ratio(ratio) + " DCP", "met": bool(ratio <= 1.0), "note": ""})
    return rows


def render(raw: dict[str, Any], table: dict[str, Any], machine: dict[str, Any], load: dict[str, float]) -> str:
    def cell(entry: dict[str, Any], key: str) -> str:
        lo, hi = entry[f"{key}_range"]
        return f"{fmt_s(entry[f'{key}_s'])} ({fmt_s(lo)}-{fmt_s(hi)})"

    rows = []
    for name in raw["contenders"]:
        e = table[name]
        rows.append(
            [
                name,
                cell(e, "stall"),
                cell(e, "durable"),
                fmt_ratio(e.get("stall_x_dcp")),
                fmt_ratio(e.get("durable_x_dcp")),
                fmt_ratio(e.get("durable_x_floor")),
            ]
        )
    local = raw["local_bytes"]
    lines = [
        "# Sharded saves at 2 ranks: ours vs torch.distributed.checkpoint",
        "",
        f"FSDP2 state (`fully_shard`, {raw['params_mb']:.0f} MiB of fp32 parameters plus Adam state), "
        f"2 gloo ranks on one host; local shards {local[0] / 2**20:.0f} + {local[1] / 2**20:.0f} MiB. "
        f"{len(raw['rounds'])} measured rounds after a warm-up; medians (min-max), slower rank. "
        "Ratios are medians of per-round ratios: to DCP's matching call (sync to `dcp.save`, async to "
        "`dcp.async_save`) and to the fsynced-write floor of the same round.",
        "",
        md_table(["contender", "stall", "durable", "stall x DCP", "durable x DCP", "durable x floor"], rows),
        "",
    ]
    if not raw["ours_sharded"]:
        lines += [
            "**Ours sharded was not measured**: the `CheckpointManager` under test refuses DTensor state "
            "(the sharded save of issue 15 was not on main). The `full gather + ours` rows are what this "
            "package offered instead: a full-state gather (a collective, on every save) and rank 0 "
            "writing everything.",
            "",
        ]
    lines += [
        "The floor row: stall = one copy of the rank's local shards into allocated memory, durable = one "
        "fsynced sequential write of that many bytes (both ranks at once).",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('filesystem', '?')}, "
        f"torch {machine.get('torch', '?')}; ckpt_plugins at commit {raw.get('commit', '?')}; "
        f"other processes used {load['other_processes_cores']:.1f} cores on average "
        f"(load average {load['loadavg_1m_start']:.1f} -> {load['loadavg_1m_end']:.1f}).",
        "",
        "Command: `.venv/bin/python benchmarks/bench_sharded_dcp.py` (or `benchmarks/run_all.py sharded_dcp`).",
    ]
    return "\n".join(lines)


def update_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC} has no results markers; not updated")
        return
    body = text.split("\n", 2)[2].strip()  # without the title
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-mb", type=float, default=64.0, help="fp32 parameter MiB of the model (default 64)")
    p.add_argument("--reps", type=int, default=4, help="measured rounds (default 4)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 MiB, 1 round, results/tmp only")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the figures in docs/sharded.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.params_mb, args.reps = 4.0, 1
    workdir = TMP / STEM
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    out = workdir / "raw.json"
    try:
        with OtherLoad() as load:
            _launch(args, workdir, out)
        raw = json.loads(out.read_text())
    finally:
        if out.exists():
            shutil.copy(out, TMP / f"{STEM}_raw.json")
        shutil.rmtree(workdir, ignore_errors=True)
    table = summarise(raw)
    machine = machine_info()
    text = render(raw, table, machine, load.as_dict())
    if args.quick:
        print(text)
        return 0
    payload = {"headline": headline(raw, table), "summary": table, "raw": raw, "machine": machine}
    publish(STEM, text, {**payload, "other_load": load.as_dict()})
    if not args.no_docs:
        update_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
