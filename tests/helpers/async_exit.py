"""Child for flush-at-exit tests: submits a slow async save, then exits or waits for SIGTERM.

mode "exit": returns from the script without closing the manager (interpreter exit must flush).
mode "sigterm": sleeps; the parent sends SIGTERM while the save is still being written.
mode "loop": saves without pause; the parent sends SIGTERM several times while the main thread
    is inside save() (a regression test: the handler once deadlocked on the engine's queue lock).
"""

import logging
import sys
import time

import torch

from ckpt_plugins import CheckpointManager

logging.basicConfig(level=logging.WARNING)
directory, mode = sys.argv[1], sys.argv[2]
mgr = CheckpointManager(directory, async_save=True)
original = mgr.storage.open_write


def slow_open_write(path):
    time.sleep(0.5)  # every file takes a while: the save is still pending when we exit
    return original(path)


if mode == "loop":
    print("save submitted", flush=True)
    step = 0
    while True:
        step += 1
        mgr.save(step, {"w": torch.arange(10.0)})
mgr.storage.open_write = slow_open_write
mgr.save(7, {"w": torch.arange(10.0)})
print("save submitted", flush=True)
if mode == "sigterm":
    time.sleep(30)  # SIGTERM arrives here
