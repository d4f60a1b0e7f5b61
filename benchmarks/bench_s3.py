"""Benchmark saving to and restoring from S3 (moto's standalone server on 127.0.0.1, through s3fs).

For one state of about 256 MiB (float32 tensors), in the same run against the same server, rounds
interleaved:

* **ours, save** - ``CheckpointManager("s3://...").save(step, state)`` until it returns (sync: the
  manifest is in the store, the checkpoint is durable), a fresh prefix each round;
* **s3fs.put_file** - the same bytes (our tensor file, from a local file in the page cache) with
  ``s3fs.S3FileSystem.put_file``: the raw upload floor;
* **DCP FsspecWriter** - ``torch.distributed.checkpoint.save`` of the same state with
  ``FsspecWriter`` to the same server;
* **ours, restore** - ``mgr.restore(step)`` with checksums verified, against **s3fs get**
  (``cat_file`` of the same object into memory);
* **ours + mirror** - ``CheckpointManager("s3://...", mirror=<local dir>)``: the time until
  ``save()`` returns (committed in the local directory: what training waits for) and until the
  background upload has committed it in the store (``mgr.mirror.wait()``), beside the same save
  to a local directory without a mirror (the floor of the local commit) and the raw put.

The server is a Python process on the same (small, shared) machine, so absolute throughput says
more about moto than about S3; the ratios are the point. Run:
``.venv/bin/python benchmarks/bench_s3.py [--mib 256] [--rounds 3]``. Writes
``benchmarks/results/s3.md`` and ``s3.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))

from common import OtherLoad, machine_info, md_table, publish  # noqa: E402


def _state(mib: int) -> dict:
    torch.manual_seed(0)
    per = 32 << 20
    count = max(1, (mib << 20) // per)
    return {"model": {f"layer{i}.weight": torch.randn(per // 4) for i in range(count)}, "step": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from s3_server import start_s3_server

    server = start_s3_server()
    os.environ.update(server.env)
    try:
        return _run(server, args)
    finally:
        server.stop()


def _run(server, args) -> int:
    import s3fs
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    from ckpt_plugins import CheckpointManager

    started = time.time()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    options = server.storage_options()
    fs = s3fs.S3FileSystem(**options)
    state = _state(args.mib)
    nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    samples: dict[str, list[float]] = {
        "ours_save": [],
        "put_file": [],
        "dcp_save": [],
        "ours_restore": [],
        "get": [],
        "mirror_local": [],
        "mirror_uploaded": [],
        "local_save": [],
    }
    load = OtherLoad().__enter__()  # how busy the machine was with other work (shared machines)
    with tempfile.TemporaryDirectory() as tmp:
        with CheckpointManager(Path(tmp) / "local") as local:  # the same bytes as a local file, for put_file
            local.save(1, state)
        local_file = str(Path(tmp) / "local" / "step_1" / "state.safetensors")
        file_bytes = os.path.getsize(local_file)
        for r in range(args.rounds + 1):  # round 0 warms the server and the connections up
            url = f"s3://{bucket}/ours-{r}"
            t0 = time.perf_counter()
            with CheckpointManager(url, storage_options=options) as mgr:
                t1 = time.perf_counter()
                mgr.save(1, state)
                t2 = time.perf_counter()
                restored = mgr.restore(1)
                t3 = time.perf_counter()
            assert torch.equal(restored["model"]["layer0.weight"], state["model"]["layer0.weight"])
            del restored
            raw = f"{bucket}/raw-{r}/state.safetensors"
            t4 = time.perf_counter()
            fs.put_file(local_file, raw)
            t5 = time.perf_counter()
            fs.invalidate_cache()
            t6 = time.perf_counter()
            data = fs.cat_file(raw)
            t7 = time.perf_counter()
            assert len(data) == file_bytes
            del data
            t8 = time.perf_counter()
            dcp.save(state, storage_writer=FsspecWriter(f"s3://{bucket}/dcp-{r}", **options))
            t9 = time.perf_counter()
            with CheckpointManager(
                f"s3://{bucket}/mirror-{r}", storage_options=options, mirror=Path(tmp) / f"mirror-{r}"
            ) as mgr:
                t10 = time.perf_counter()
                mgr.save(1, state)
                t11 = time.perf_counter()
                mgr.mirror.wait()
                t12 = time.perf_counter()
            with CheckpointManager(Path(tmp) / f"plain-{r}") as plain:
                t13 = time.perf_counter()
                plain.save(1, state)
                t14 = time.perf_counter()
            for prefix in ("ours", "raw", "dcp", "mirror"):  # keep the server's memory bounded
                fs.rm(f"{bucket}/{prefix}-{r}", recursive=True)
            if r == 0:
                continue
            samples["mirror_local"].append(t11 - t10)
            samples["mirror_uploaded"].append(t12 - t10)
            samples["local_save"].append(t14 - t13)
            samples["ours_save"].append(t2 - t1)
            samples["ours_restore"].append(t3 - t2)
            samples["put_file"].append(t5 - t4)
            samples["get"].append(t7 - t6)
            samples["dcp_save"].append(t9 - t8)
            print(
                f"round {r}: ours save {t2 - t1:.2f} s (open {t1 - t0:.2f} s), put_file {t5 - t4:.2f} s, "
                f"dcp {t9 - t8:.2f} s, ours restore {t3 - t2:.2f} s, get {t7 - t6:.2f} s, mirror: local commit "
                f"{t11 - t10:.2f} s, uploaded {t12 - t10:.2f} s, local save {t14 - t13:.2f} s",
                flush=True,
            )
    load.__exit__(None, None, None)
    med = {k: statistics.median(v) for k, v in samples.items()}
    mbps = {k: nbytes / v / 1e6 for k, v in med.items()}
    # Paired: each round's ratio to the raw transfer of the same round (the machine is shared, and
    # its load moves between rounds more than between neighbouring measurements), then the median.
    save_ratio = statistics.median(o / r for o, r in zip(samples["ours_save"], samples["put_file"], strict=True))
    restore_ratio = statistics.median(o / r for o, r in zip(samples["ours_restore"], samples["get"], strict=True))
    dcp_ratio = statistics.median(o / r for o, r in zip(samples["dcp_save"], samples["put_file"], strict=True))

    def vs_put(key: str) -> float:
        return statistics.median(o / r for o, r in zip(samples[key], samples["put_file"], strict=True))

    local_ratio = statistics.median(o / r for o, r in zip(samples["mirror_local"], samples["local_save"], strict=True))
    rows = [
        ("ours: save (durable)", f"{med['ours_save']:.2f} s", f"{mbps['ours_save']:.0f}", f"{save_ratio:.2f}x"),
        ("s3fs.put_file (raw)", f"{med['put_file']:.2f} s", f"{mbps['put_file']:.0f}", "1.00x"),
        ("DCP FsspecWriter", f"{med['dcp_save']:.2f} s", f"{mbps['dcp_save']:.0f}", f"{dcp_ratio:.2f}x"),
        (
            "ours: restore (verified)",
            f"{med['ours_restore']:.2f} s",
            f"{mbps['ours_restore']:.0f}",
            f"{restore_ratio:.2f}x of get",
        ),
        ("s3fs get (cat_file)", f"{med['get']:.2f} s", f"{mbps['get']:.0f}", "1.00x"),
        (
            "ours + mirror: save() returns (local commit)",
            f"{med['mirror_local']:.2f} s",
            f"{mbps['mirror_local']:.0f}",
            f"{vs_put('mirror_local'):.2f}x ({local_ratio:.2f}x of a local save)",
        ),
        (
            "ours + mirror: uploaded (in the store)",
            f"{med['mirror_uploaded']:.2f} s",
            f"{mbps['mirror_uploaded']:.0f}",
            f"{vs_put('mirror_uploaded'):.2f}x",
        ),
        ("ours: local save, no mirror (floor)", f"{med['local_save']:.2f} s", f"{mbps['local_save']:.0f}", ""),
    ]
    headline = [
        {
            "target": "S3 save: time to durable <= 1.2x s3fs.put_file",
            "measured": f"{save_ratio:.2f}x",
            "met": save_ratio <= 1.2,
            "note": f"median of per-round ratios, {args.rounds} rounds, {nbytes / 2**20:.0f} MiB, moto server",
        },
        {
            "target": "S3 restore <= 1.2x s3fs get",
            "measured": f"{restore_ratio:.2f}x",
            "met": restore_ratio <= 1.2,
            "note": "ours verifies every checksum; get does not",
        },
    ]
    text = "\n".join(
        [
            "# S3 (moto server on loopback, through s3fs)",
            "",
            f"One save of {nbytes / 2**20:.0f} MiB of float32 tensors; median of {args.rounds} rounds after one "
            "warm-up (ratios: the median of each round's ratio to the raw transfer of that round), every method "
            "against the same server in the same run. The server is a Python process on the same machine, so the "
            "absolute MB/s are moto's; read the ratios.",
            "",
            md_table(["method", "median time", "MB/s", "vs raw (paired median)"], rows),
            "",
            "Every sample (seconds): " + ", ".join(f"{k} {[f'{x:.2f}' for x in v]}" for k, v in samples.items()),
            "",
            f"Load: other processes used {load.other_cores:.2f} of {os.cpu_count()} cores on average during the "
            f"rounds (the moto server, a child process, counts among them); 1-minute load average "
            f"{load.loadavg_start:.1f} at the start, {load.loadavg_end:.1f} at the end.",
            "",
            "Command: `.venv/bin/python benchmarks/bench_s3.py"
            + (f" --mib {args.mib}" if args.mib != 256 else "")
            + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
            + "`",
        ]
    )
    publish(
        "s3",
        text,
        {
            "headline": headline,
            "bytes": nbytes,
            "rounds": args.rounds,
            "samples": samples,
            "median_s": med,
            "mb_per_s": mbps,
            "machine": machine_info(),
            "load": load.as_dict(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "elapsed_s": time.time() - started,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
