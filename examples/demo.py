"""`make demo`: train, crash, resume, and show that nothing was lost, three times:
a plain PyTorch loop, LightningCLI (``examples/lightning``) and the HF Trainer (``examples/hf``).

Plain PyTorch:
1. A reference run trains the tiny model for 60 steps without interruption.
2. The same run with ckpt_plugins saving every 5 steps (async, keep_last=3 plus the best by loss)
   SIGKILLs itself at step 37, between two saves.
3. A second process resumes from the latest checkpoint and finishes.
4. The final weights are compared with the reference bit for bit, and ``ckpt-plugins ls`` shows
   which checkpoints were kept and why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent
RUNS = ROOT.parent / "demo_runs"


def run(*args: str, expect_kill: bool = False) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, *args], check=False)
    if expect_kill:
        if proc.returncode != -9:
            sys.exit(f"expected the run to be killed by SIGKILL, got exit code {proc.returncode}")
        print(f"(process died from SIGKILL, exit code {proc.returncode})")
    elif proc.returncode != 0:
        sys.exit(f"command failed with exit code {proc.returncode}")


def main() -> None:
    plain()
    section("Lightning: LightningCLI + CheckpointCallback, SIGKILL, --ckpt_path last")
    run_example("lightning")
    section("Hugging Face: Trainer + CheckpointCallback, SIGKILL, resume_from_checkpoint")
    run_example("hf")


def section(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def run_example(name: str) -> None:
    """Each framework's demo in its own process, so that their imports stay apart."""
    proc = subprocess.run([sys.executable, str(ROOT / name / "demo.py")], check=False)
    if proc.returncode != 0:
        sys.exit(f"the {name} demo failed (exit code {proc.returncode})")


def plain() -> None:
    section("Plain PyTorch: CheckpointManager in a hand-written loop, SIGKILL, resume")
    shutil.rmtree(RUNS / "plain", ignore_errors=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    train = str(ROOT / "plain" / "train.py")
    ckpt_dir = str(RUNS / "plain")

    print("== 1. reference run: 60 steps, no checkpoints, no interruption")
    run(
        train,
        "--dir",
        ckpt_dir,
        "--steps",
        "60",
        "--no-checkpoints",
        "--final-weights",
        str(RUNS / "reference.safetensors"),
    )

    print("\n== 2. checkpointed run that crashes (SIGKILL) at step 37")
    run(
        train,
        "--dir",
        ckpt_dir,
        "--steps",
        "60",
        "--die-at-step",
        "37",
        "--stats",
        str(RUNS / "stats1.json"),
        expect_kill=True,
    )

    print("\n== 3. resume from the latest checkpoint and finish")
    run(
        train,
        "--dir",
        ckpt_dir,
        "--steps",
        "60",
        "--final-weights",
        str(RUNS / "resumed.safetensors"),
        "--stats",
        str(RUNS / "stats2.json"),
    )

    print("\n== 4. what happened")
    from ckpt_plugins.cli import main as cli

    print(f"$ ckpt-plugins ls {ckpt_dir} --keep-last 3 --keep-best 1 --monitor loss")
    cli(["ls", ckpt_dir, "--keep-last", "3", "--keep-best", "1", "--monitor", "loss"])
    reference = load_file(str(RUNS / "reference.safetensors"))
    resumed = load_file(str(RUNS / "resumed.safetensors"))
    identical = reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    stalls = json.loads((RUNS / "stats1.json").read_text())["stall_s"] if (RUNS / "stats1.json").exists() else []
    stalls += json.loads((RUNS / "stats2.json").read_text())["stall_s"]
    stalls.sort()
    print(
        f"\nsaves: {len(stalls)}, training blocked per save: median {stalls[len(stalls) // 2] * 1e3:.1f} ms, "
        f"max {stalls[-1] * 1e3:.1f} ms (the rest of each save ran in the background)"
    )
    print(f"resumed run == uninterrupted run, bit for bit: {identical}")
    if not identical:
        sys.exit("the resumed run diverged from the reference")


if __name__ == "__main__":
    main()
