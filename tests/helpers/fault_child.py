"""Child for storage-fault tests; prints one JSON line with what happened.

scenario "fill": save ever larger checkpoints (keep_last=3) until a save fails; the parent runs
    this on a tiny file system (tmpfs) or under RLIMIT_FSIZE.
scenario "readonly": save step 1, lose write permission on the directory (drop root to nobody,
    or chmod when not root), then save step 2 (sync and async) and list/restore.
"""

import json
import os
import signal
import sys

import torch

import ckpt_plugins.formats  # noqa: F401 - import everything before privileges are dropped
from ckpt_plugins import CheckpointManager, CheckpointError

directory, scenario = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # RLIMIT_FSIZE: get EFBIG instead of a signal
result: dict = {"errors": []}


def state(step, grow=False):
    rows = 64 * step if grow else 64  # growing checkpoints: 256 KiB, 512 KiB, ...
    return {"w": torch.full((rows, 1024), float(step)), "step": step}


if scenario == "fill":
    with CheckpointManager(directory, keep_last=3) as mgr:
        for step in range(1, 100):
            try:
                mgr.save(step, state(step, grow=True))
            except OSError as exc:
                result["errors"].append(f"{type(exc).__name__}: {exc}")
                break
        result["steps"] = mgr.steps()
        result["restored"] = [mgr.restore(s)["step"] for s in mgr.steps()]
    result["leftovers"] = [n for n in os.listdir(directory) if n.startswith(".tmp")]
elif scenario == "readonly":
    mgr = CheckpointManager(directory, keep_last=1)
    mgr.save(1, state(1))
    async_mgr_dir = os.path.join(directory, "async")
    amgr = CheckpointManager(async_mgr_dir, keep_last=1, async_save=True)
    amgr.save(1, state(1)).wait()
    fresh = os.path.join(directory, "fresh")
    with CheckpointManager(fresh) as closed:
        closed.save(1, state(1))
    for path in (directory, async_mgr_dir, fresh):
        os.chmod(path, 0o555)
    if os.geteuid() == 0:  # root ignores permission bits: become nobody
        os.setgid(65534)
        os.setuid(65534)
    try:
        mgr.save(2, state(2))
    except OSError as exc:
        result["errors"].append(f"sync {type(exc).__name__}: {exc}")
    amgr.save(2, state(2))
    try:
        amgr.wait()
    except CheckpointError as exc:
        result["errors"].append(f"async {type(exc).__name__}: {exc}")
    result["steps"] = [mgr.steps(), amgr.steps()]
    result["restored"] = [mgr.restore("latest")["step"], amgr.restore("latest")["step"]]
    try:
        CheckpointManager(fresh)
    except CheckpointError as exc:
        result["errors"].append(f"open {type(exc).__name__}: {exc}")
    reader = CheckpointManager(fresh, read_only=True)
    result["read_only_restore"] = reader.restore("latest")["step"]
    mgr._closed = amgr._closed = True  # cannot release locks without write permission
print(json.dumps(result), flush=True)
