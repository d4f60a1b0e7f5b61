"""The Lightning demo: train, crash, resume with ``--ckpt_path last``, and show nothing was lost.

1. A reference run fine-tunes the tiny GPT-2 for 40 steps (``train.py`` + ``config.yaml``:
   ``CheckpointCallback`` saving every 5 steps asynchronously, keep_last=2 + the best by val_loss,
   selective activation checkpointing).
2. The same run in a separate process is SIGKILLed at step 23, mid-epoch, with a save possibly
   still in flight.
3. ``train.py fit --ckpt_path last`` resumes from the newest committed checkpoint and finishes.
4. The summary: which checkpoints are kept and why, how long each save blocked training, and the
   final checkpoint of the resumed run compared tensor by tensor with the reference's.

Runs 1 and 3 use LightningCLI in this process (one Lightning import for the demo); run 2 is a
child process so that it can really be killed. ``python examples/lightning/demo.py``
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ckpt_plugins.layout.naming import natural_key

HERE = Path(__file__).resolve().parent
RUNS = HERE.parents[1] / "demo_runs" / "lightning"
CONFIG = HERE / "config.yaml"
CRASH_AT = 23


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        *extra,
    ]


def _in_process(args: list[str]) -> None:
    """``train.py args`` in this process (loaded under its own name: other demos have a train.py)."""
    spec = importlib.util.spec_from_file_location("ckpt_plugins_lightning_example_train", HERE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.main(args)


def _checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "logs" / "main" / "checkpoints"


def _stalls(path: Path) -> list[tuple[int, float]]:
    """(step, seconds) of every save in a CSVLogger metrics file (``checkpoint/stall_s``)."""
    if not path.exists():
        return []
    with open(path) as f:
        return [
            (int(row["step"]), float(row["checkpoint/stall_s"]))
            for row in csv.DictReader(f)
            if row.get("checkpoint/stall_s")
        ]


def _leaves(obj: object, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def _compare(a: Path, b: Path) -> tuple[bool, int]:
    """Weights, optimizer and scheduler state of two checkpoints: all equal? how many tensors?"""
    from ckpt_plugins.lightning import read_lightning_checkpoint

    parts = ("state_dict", "optimizer_states", "lr_schedulers")
    left = _leaves({k: v for k, v in read_lightning_checkpoint(a).items() if k in parts})
    right = _leaves({k: v for k, v in read_lightning_checkpoint(b).items() if k in parts})
    same = left.keys() == right.keys() and all(
        torch.equal(x, right[k]) if isinstance(x, torch.Tensor) else x == right[k] for k, x in left.items()
    )
    return same, sum(isinstance(v, torch.Tensor) for v in left.values())


def _retention_table(ckpt_dir: Path) -> str:
    from ckpt_plugins import CheckpointManager
    from ckpt_plugins.lightning.convert import CALLBACK_NAMES  # the callback names as ModelCheckpoint does

    options = next(
        cb["init_args"]
        for cb in yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
        if cb["class_path"].endswith("CheckpointCallback")
    )
    rules = {k: options.get(k) for k in ("keep_last", "keep_best", "monitor", "mode", "keep_every_n_steps")}
    with CheckpointManager(ckpt_dir, read_only=True, name_template=CALLBACK_NAMES, **rules) as mgr:
        decision = mgr.retention()
        lines = [f"{'step':>6}  {'val_loss':>9}  kept because"]
        for record in mgr.records():
            value = record.metrics.get("val_loss")
            lines.append(
                f"{record.step:>6}  {value if value is None else f'{value:.4f}':>9}  "
                f"{', '.join(decision.keep.get(record.step, ['(would be pruned)']))}"
            )
    return "\n".join(lines)


def main() -> None:
    """Run the demo (about 30-60 s on a laptop CPU); exit non-zero if the resume diverged."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # a tiny model: one thread is the fastest
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    shutil.rmtree(RUNS, ignore_errors=True)
    reference, crashed = RUNS / "reference", RUNS / "crashed"
    try:
        print("== 1. reference run: 40 steps, no interruption (in this process)", flush=True)
        _in_process(_args(reference))

        print(f"\n== 2. the same run in a child process, SIGKILLed at step {CRASH_AT}", flush=True)
        command = [
            sys.executable,
            str(HERE / "train.py"),
            *_args(
                crashed,
                "--trainer.callbacks+=tiny_gpt.SimulateCrash",
                f"--trainer.callbacks.init_args.at_step={CRASH_AT}",
            ),
        ]
        proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
        if proc.returncode != -9:
            sys.exit(f"expected the run to die from SIGKILL, got exit code {proc.returncode}")
        survived = sorted(p.name for p in _checkpoint_dir(crashed).glob("*step=*.ckpt"))
        print(f"(died from SIGKILL; committed checkpoints: {', '.join(survived) or 'none'})", flush=True)
        metrics = crashed / "logs" / "main" / "metrics.csv"
        if metrics.exists():  # the resumed run's CSVLogger starts a new file in the same place
            shutil.copy(metrics, crashed / "metrics_before_crash.csv")

        print("\n== 3. resume: train.py fit ... --ckpt_path last (in this process)", flush=True)
        _in_process(_args(crashed, "--ckpt_path", "last"))
    finally:
        torch.set_num_threads(threads)

    print("\n== 4. what happened")
    print(f"checkpoints in {_checkpoint_dir(crashed)}:")
    print(_retention_table(_checkpoint_dir(crashed)))
    for name, path in (
        ("crashed run", crashed / "metrics_before_crash.csv"),
        ("resumed run", crashed / "logs" / "main" / "metrics.csv"),
    ):
        stalls = _stalls(path)
        print(
            f"training blocked per save, {name}: "
            + (", ".join(f"step {s}: {t * 1e3:.1f} ms" for s, t in stalls) or "(no save logged)")
        )
    final_name = max((p.name for p in _checkpoint_dir(reference).glob("*step=*.ckpt")), key=natural_key)
    final = int(final_name.rsplit("step=", 1)[1].split(".")[0])
    same, count = _compare(_checkpoint_dir(reference) / final_name, _checkpoint_dir(crashed) / final_name)
    print(
        f"step {final}: resumed run == uninterrupted run, {count} tensors (weights, Adam moments, "
        f"schedule) bit for bit: {same}"
    )
    if not same:
        sys.exit("the resumed run diverged from the reference")


if __name__ == "__main__":
    main()
