"""Child process for the dedup crash tests: saves with ``dedup=True`` in a loop until killed.

A frozen 2 MiB tensor and a small one that changes every step; keep_last=2 and
keep_every_n_steps=5, so retention deletes checkpoints whose shared file later ones read.
Prints "ready", then "committed <step>" after each save returns.

    python dedup_forever.py DIR sync|async [--kill-at-removal N]

``--kill-at-removal N``: SIGKILL this process at the N-th removal of a shared file, half of the
time just before it and half just after (the removal's index decides), to cut a retention delete.
"""

import os
import signal
import sys

import torch

from ckpt_plugins import CheckpointManager

directory, mode = sys.argv[1], sys.argv[2]
kill_at = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--kill-at-removal" else None
frozen = torch.Generator().manual_seed(0)
frozen = torch.randn(512, 1024, generator=frozen)
with CheckpointManager(directory, keep_last=2, keep_every_n_steps=5, async_save=mode == "async", dedup=True) as mgr:
    if kill_at is not None:
        removals = 0
        original = mgr.storage.remove_file

        def remove_file(path):
            global removals
            if "/.shared/" in path.replace("\\", "/"):
                removals += 1
                if removals == kill_at and kill_at % 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                original(path)
                if removals == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return None
            return original(path)

        mgr.storage.remove_file = remove_file
    step = (mgr.latest_step() or 0) + 1
    print("ready", flush=True)
    while True:
        state = {"frozen": frozen, "w": torch.full((64, 64), float(step)), "step": step}
        handle = mgr.save(step, state)
        if mode == "async":
            handle.wait()
        print(f"committed {step}", flush=True)
        step += 1
