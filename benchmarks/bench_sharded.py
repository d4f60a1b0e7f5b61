"""Sharded saves at world sizes 1, 2, 4 and 8: the time per rank and the metadata each save exchanges.

Weak scaling on one host: every rank holds the same amount of sharded state (``--mb`` MiB of
DTensor shards in 16 tensors, plus a few replicated plain tensors), so a save whose cost per
rank does not depend on the world size takes the same time at every size. On a box with fewer
cores than ranks the processes share CPUs and disk; the floor measured in the same round (each
rank writing and fsyncing its shard bytes at the same moment as the others) shares them too, so
the ratio to the floor is the figure that shows whether coordination grows with the world.

Per round and rank: ``save()`` (synchronous: returns once rank 0 has committed), the floor, and
the agreement alone (the one ``all_gather_object`` of the fixed-size per-rank view every save
does). Metadata: the bytes of that view (pickled, what ``all_gather_object`` sends; every rank
receives ``world x`` it), and the bytes of the rank's part file (its chunk entries, read by rank 0
from the checkpoint folder, not by a collective).

Usage::

    .venv/bin/python benchmarks/bench_sharded.py            # ~2 min on an idle 2-core box
    .venv/bin/python benchmarks/bench_sharded.py --quick    # a smoke run

Writes ``results/sharded.{md,json}`` and the figures block of ``docs/sharded.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, TMP, free_port, fsync_file, machine_info, md_table, publish  # noqa: E402

DOC = REPO / "docs" / "sharded.md"
BEGIN, END = "<!-- bench_sharded:begin -->", "<!-- bench_sharded:end -->"
TENSORS = 16


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from ckpt_plugins import CheckpointManager
    from ckpt_plugins.sharded.save import summary

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = int(args.mb * 2**20 / 4 / 1024 / TENSORS)
    torch.manual_seed(rank)
    state = {
        "model": {
            f"layer{i}.weight": DTensor.from_local(torch.randn(rows, 1024), mesh, [Shard(0)], run_check=False)
            for i in range(TENSORS)
        },
        "norms": {f"norm{i}": torch.ones(1024) for i in range(4)},  # replicated: rank 0 writes them
        "step": 0,
    }
    local = torch.cat([t.to_local().reshape(-1) for t in state["model"].values()])
    workdir = Path(args.workdir)
    out: dict[str, Any] = {"save_s": [], "floor_s": [], "agree_s": []}
    with CheckpointManager(workdir / "run", keep_last=1, direct_io=False) as mgr:
        for step in range(args.reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            mgr.save(step, state)
            save_s = time.perf_counter() - t0
            dist.barrier()
            floor_path = workdir / f"floor_{rank}"
            t0 = time.perf_counter()
            with open(floor_path, "wb") as f:
                f.write(local.numpy().tobytes())
            fsync_file(floor_path)
            floor_s = time.perf_counter() - t0
            floor_path.unlink()
            view = (step, None, None, "0" * 12, False, None, summary({}))
            dist.barrier()
            t0 = time.perf_counter()
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, view)
            agree_s = time.perf_counter() - t0
            if step:  # the first round warms up
                out["save_s"].append(save_s)
                out["floor_s"].append(floor_s)
                out["agree_s"].append(agree_s)
        from ckpt_plugins.persist.request import flatten_parts

        flat, _, _ = flatten_parts(state, None, rank=rank, world_size=world)
        view = (args.reps, None, None, "0" * 12, False, None, summary(flat.shards))
        out["view_bytes"] = len(pickle.dumps(view))
        manifest = json.loads((Path(mgr.path_for(args.reps)) / "manifest.json").read_bytes())
        chunks = {
            k: [c for c in e["chunks"] if c["file"] == f"shard_{rank}.safetensors"]
            for k, e in manifest["sharded"]["tensors"].items()
        }
        out["part_bytes"] = len(json.dumps({"tree": None, "files": {}, "shards": chunks}))
        out["manifest_bytes"] = len(json.dumps(manifest))
        out["local_bytes"] = local.numel() * 4
    (workdir / f"result_{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(TMP) / f"bench_sharded_{world}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    argv = [
        sys.executable,
        __file__,
        "--worker",
        "--workdir",
        str(workdir),
        "--mb",
        str(args.mb),
        "--reps",
        str(args.reps),
    ]
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r)}) for r in range(world)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a rank failed at world size {world}")
    results = [json.loads((workdir / f"result_{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def summarise(world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    def slowest(key: str) -> list[float]:  # per round, the slowest rank (training waits for it)
        return [max(r[key][i] for r in ranks) for i in range(len(ranks[0][key]))]

    save, floor, agree = slowest("save_s"), slowest("floor_s"), slowest("agree_s")
    return {
        "world": world,
        "save_s": statistics.median(save),
        "floor_s": statistics.median(floor),
        "ratio": statistics.median(s / f for s, f in zip(save, floor, strict=True)),
        "agree_s": statistics.median(agree),
        "view_bytes": max(r["view_bytes"] for r in ranks),
        "received_bytes": world * max(r["view_bytes"] for r in ranks),
        "part_bytes": max(r["part_bytes"] for r in ranks),
        "manifest_bytes": ranks[0]["manifest_bytes"],
        "local_mb": ranks[0]["local_bytes"] / 2**20,
    }


def render(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    table = md_table(
        [
            "ranks",
            "save per rank",
            "floor (write+fsync)",
            "save / floor",
            "agreement",
            "view (B)",
            "received per rank (B)",
            "part file (B)",
            "manifest (B)",
        ],
        [
            [
                r["world"],
                f"{r['save_s'] * 1000:.0f} ms",
                f"{r['floor_s'] * 1000:.0f} ms",
                f"{r['ratio']:.2f}x",
                f"{r['agree_s'] * 1000:.1f} ms",
                r["view_bytes"],
                r["received_bytes"],
                r["part_bytes"],
                r["manifest_bytes"],
            ]
            for r in rows
        ],
    )
    return (
        f"Sharded save, weak scaling: {rows[0]['local_mb']:.0f} MiB of DTensor shards per rank ({TENSORS} "
        f"tensors) + 4 replicated tensors; medians of {args.reps} rounds, the slowest rank per round. "
        f"Machine: {machine.get('cores')} cores, {machine.get('filesystem', '')}.\n\n"
        f"{table}\n\n"
        "`python benchmarks/bench_sharded.py`. The view is the fixed-size tuple each rank sends in the one "
        "`all_gather_object` of a save; the part file carries the rank's chunk entries to rank 0 through the "
        "checkpoint folder.\n"
    )


def update_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + BEGIN + "\n" + text + END + rest.split(END, 1)[1]
        DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--mb", type=float, default=16.0, help="MiB of shards per rank")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.mb, args.reps, args.worlds = 1.0, 2, "1,2"
    rows = [summarise(w, run_world(w, args)) for w in (int(x) for x in args.worlds.split(","))]
    machine = machine_info()
    text = render(rows, machine, args)
    if args.quick:
        print(text)
        return 0
    publish("sharded", text, {"rows": rows, "machine": machine, "mb": args.mb, "reps": args.reps})
    update_doc(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
