"""Child for storage-fault tests; prints one JSON line with what happened.

scenario "fill": save ever larger checkpoints (keep_last=3) until a save fails; the parent runs
    this on a tiny file system (tmpfs) or under RLIMIT_FSIZE.
scenario "readonly": save step 1, lose write permission on the directory (chmod 0555), then save
    step 2 (sync and async) and list/restore.

As root the "readonly" child stays uid 0 and gives up, first thing, CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH and CAP_FOWNER: it then obeys the permission bits of the directories it owns,
and can still read the checkout and the venv, which may sit in a folder only root can enter (a
clone in root's 0700 home). Becoming nobody instead made every later lazy import, of ours or of
torch, fail there. Capabilities belong to a thread and are inherited by the threads it starts, so
they are dropped before any other thread exists (the async writer's included).
"""

import ctypes
import ctypes.util
import json
import os
import signal
import sys

_CAPS_BYPASSING_PERMISSIONS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def obey_permission_bits() -> None:
    """Drop, for good, the capabilities that let root ignore permission bits (capget/capset, v3)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    mask = ~sum(1 << cap for cap in _CAPS_BYPASSING_PERMISSIONS) & 0xFFFFFFFF
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & mask)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed: cannot drop CAP_DAC_OVERRIDE to test permission errors")


directory, scenario = sys.argv[1], sys.argv[2]
if scenario == "readonly" and os.geteuid() == 0:  # root ignores permission bits unless it gives this up
    obey_permission_bits()

import torch  # noqa: E402 - after the capabilities are dropped, so that no thread keeps them

from ckpt_plugins import CheckpointError, CheckpointManager  # noqa: E402

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
