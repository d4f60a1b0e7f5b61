"""Child process for the mirror crash test: saves steps 1..N through a local mirror, printing
"committed <step>" after each save returns (committed locally), then sleeps until it is killed.
The endpoint comes from ``AWS_ENDPOINT_URL``, as in a job."""

import sys
import time

import torch

from ckpt_plugins import CheckpointManager

url, local, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
mgr = CheckpointManager(url, mirror=local, keep_local=1)
for step in range(1, count + 1):
    mgr.save(step, {"model": {"w": torch.full((64, 32), float(step))}, "step": step})
    print(f"committed {step}", flush=True)
time.sleep(600)
