"""Child process for the mirror crash tests: saves through a local mirror, printing "committed <step>"
after each save returns (committed locally); with COUNT > 0 it saves steps 1..COUNT then sleeps
until it is killed, with COUNT 0 it saves until it is killed (continuing after the newest step).
With ``names``, checkpoints are named as Lightning's callback names them (``TEMPLATE``) and each
step is saved again as the named checkpoint ``last.ckpt``. The endpoint comes from
``AWS_ENDPOINT_URL``, as in a job.

    python mirror_child.py URL LOCAL COUNT [sync|async] [names]
"""

import itertools
import sys
import time

import torch

from ckpt_plugins import CheckpointManager

url, local, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
async_save = len(sys.argv) > 4 and sys.argv[4] == "async"
names = len(sys.argv) > 5 and sys.argv[5] == "names"
TEMPLATE = "epoch=0-step={step}{version}.ckpt"
mgr = CheckpointManager(
    url, mirror=local, keep_local=1, keep_last=3, async_save=async_save, name_template=TEMPLATE if names else None
)
first = (mgr.latest_step() or 0) + 1
print("ready", flush=True)
steps = range(first, first + count) if count else itertools.count(first)
for step in steps:
    state = {"model": {"w": torch.full((256, 256), float(step))}, "step": step}
    handle = mgr.save(step, state)
    handle.wait()
    if names:
        mgr.save(step, state, name="last.ckpt").wait()
    print(f"committed {step}", flush=True)
time.sleep(600)
