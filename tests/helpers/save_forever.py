"""Child process for crash tests: saves checkpoints in a loop until it is killed.

Prints "ready" once imports are done, then "committed <step>" after each save returns, so the
parent knows which steps were durable before it sent SIGKILL.
"""

import sys

import torch

from ckpt_plugins import CheckpointManager

directory, async_save = sys.argv[1], sys.argv[2] == "async"
torch.manual_seed(0)
with CheckpointManager(directory, keep_last=2, keep_every_n_steps=7, async_save=async_save) as mgr:
    step = (mgr.latest_step() or 0) + 1
    print("ready", flush=True)
    while True:
        state = {"model": {"w": torch.full((512, 1024), float(step)), "b": torch.arange(step + 1)}, "step": step}
        handle = mgr.save(step, state, metrics={"loss": 1.0 / step})
        if async_save:
            handle.wait()
        print(f"committed {step}", flush=True)
        step += 1
