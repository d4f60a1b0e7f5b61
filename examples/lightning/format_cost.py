"""What one file per Lightning checkpoint costs against a checkpoint folder (docs/lightning.md).

Saves and restores the same ~100 MB state (a Lightning-like dict: weights, Adam moments, loop
counters) five times each way, synchronously, every write fsynced, and prints the median times:

* folder: ``CheckpointManager.save(step, state)`` then ``restore(step)`` (manifest.json +
  state.safetensors, checksums verified), what ``CheckpointCallback`` writes;
* single file: ``write_single_file`` then ``read_single_file`` (one safetensors file with the tree
  and the data checksum in its header, verified), what ``CheckpointIOPlugin`` writes.

    python examples/lightning/format_cost.py [--mb 100] [--dir /tmp/format_cost]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.files.single_file import read_single_file, write_single_file
from ckpt_plugins.storage import LocalStorage
from ckpt_plugins.tree.codec import flatten_state


def lightning_like_state(megabytes: int) -> dict:
    per_tensor = 1 << 20  # 4 MiB of float32 each
    count = max(1, megabytes * (1 << 20) // (4 * per_tensor) // 3)
    weights = {f"layer{i}.weight": torch.randn(per_tensor) for i in range(count)}
    moments = {
        i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(per_tensor), "exp_avg_sq": torch.rand(per_tensor)}
        for i in range(count)
    }
    return {
        "epoch": 1,
        "global_step": 10,
        "state_dict": weights,
        "optimizer_states": [{"state": moments, "param_groups": [{"lr": 1e-3, "params": list(range(count))}]}],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2}}}},
        "hyper_parameters": {"lr": 1e-3},
    }


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="format_cost-")
    state = lightning_like_state(args.mb)
    flat = flatten_state(state)
    nbytes = sum(t.numel() * t.element_size() for t in flat.tensors.values())
    storage, path = LocalStorage(), os.path.join(root, "model.ckpt")
    os.makedirs(root, exist_ok=True)
    with CheckpointManager(os.path.join(root, "folders"), distributed=False, overwrite=True) as mgr:
        folder_save = timed(lambda: mgr.save(1, state), args.repeats)
        folder_load = timed(lambda: mgr.restore(1), args.repeats)
    file_save = timed(lambda: write_single_file(storage, path, flat.tree, flat.tensors, {"step": 1}), args.repeats)
    file_load = timed(lambda: read_single_file(storage, path), args.repeats)
    print(f"state: {nbytes / 2**20:.0f} MiB in {len(flat.tensors)} tensors; median of {args.repeats}, fsynced")
    print(f"{'format':<12} {'save s':>8} {'restore s':>10}")
    print(f"{'folder':<12} {folder_save:8.3f} {folder_load:10.3f}")
    print(f"{'single file':<12} {file_save:8.3f} {file_load:10.3f}")
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
